# Two entry points for a fresh machine: `make demo` and `make test` (see README).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU installs pin this torch; on a GPU machine install your own first: make TORCH_SPEC=
TORCH_SPEC ?= torch==2.13.0
SHARED_DATA := $(abspath ../shared/data)
export FEDSKY_DATA ?= $(if $(wildcard $(SHARED_DATA)),$(SHARED_DATA),)

.PHONY: demo test install proto clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(if $(TORCH_SPEC),$(PY) -m pip install --quiet "$(TORCH_SPEC)")
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

demo: install
	$(VENV)/bin/fedsky run examples/quickstart.toml

test: install
	$(PY) -m pytest -q

proto: install
	bash scripts/gen_proto.sh

clean:
	rm -rf runs .pytest_cache
