"""Job config: validation, overrides, and the CLI's one-line errors with exit code 2."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from conftest import fedsky_cmd, tiny_job
from fedsky.config import load_job
from fedsky.errors import FedskyError


def test_valid_job_loads_with_defaults(tmp_path: Path, corpus_file: Path) -> None:
    job, job_dir = load_job(tiny_job(tmp_path, corpus_file))
    assert [s.name for s in job.sites] == ["a", "b", "c"]
    assert job.strategy.name == "fedavg" and job.transport.kind == "inprocess"
    assert job_dir == tmp_path.resolve()


def test_overrides_reach_nested_fields_and_lists(tmp_path: Path, corpus_file: Path) -> None:
    job, _ = load_job(tiny_job(tmp_path, corpus_file),
                      ["rounds=5", "training.lr=0.01", "sites.1.share=2.5", 'name="x"'])
    assert job.rounds == 5 and job.training.lr == 0.01
    assert job.sites[1].share == 2.5 and job.name == "x"


def test_every_invalid_field_is_reported_at_once(tmp_path: Path, corpus_file: Path) -> None:
    path = tiny_job(tmp_path, corpus_file, "bogus_key = 1\noptimizer = \"adam9\"")
    with pytest.raises(FedskyError) as err:
        load_job(path, ["rounds=-1"])
    text = str(err.value)
    assert "3 invalid field(s)" in text
    assert "training.bogus_key" in text and "unknown key" in text
    assert "training.optimizer" in text and "rounds" in text


def test_cross_field_rules(tmp_path: Path, corpus_file: Path) -> None:
    path = tiny_job(tmp_path, corpus_file)
    with pytest.raises(FedskyError, match="min_sites"):
        load_job(path, ["coordinator.min_sites=4"])
    with pytest.raises(FedskyError, match="seq_len"):
        load_job(path, ["training.seq_len=64"])
    with pytest.raises(FedskyError, match="label_column"):
        load_job(path, ['data.partition="dirichlet"'])
    with pytest.raises(FedskyError, match="unique"):
        load_job(path, ['sites.1.name="a"'])


def test_bad_override_syntax(tmp_path: Path, corpus_file: Path) -> None:
    with pytest.raises(FedskyError, match="KEY=VALUE"):
        load_job(tiny_job(tmp_path, corpus_file), ["rounds"])
    with pytest.raises(FedskyError, match="not an index"):
        load_job(tiny_job(tmp_path, corpus_file), ["sites.9.share=1"])


def _run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(fedsky_cmd(*args), cwd=cwd, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["--set", "nonsense=1"], "nonsense: Extra inputs are not permitted"),
        (["--set", 'data.train="no/such/file.txt"'], "no/such/file.txt"),
        (["--set", "sites.0.share=0.0001"], "site 0 gets no documents"),
    ],
    ids=["unknown-key", "missing-data-path", "site-with-no-document"],
)
def test_cli_bad_input_is_one_clear_error(tmp_path: Path, corpus_file: Path,
                                          overrides: list[str], expected: str) -> None:
    job = tiny_job(tmp_path, corpus_file)
    proc = _run_cli("run", str(job), *overrides, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_site_with_zero_sequences(tmp_path: Path, corpus_file: Path) -> None:
    small = tmp_path / "small.txt"
    small.write_text("only a handful of words here")
    proc = _run_cli("run", str(tiny_job(tmp_path, corpus_file)),
                    "--set", f'sites.2.path="{small}"', cwd=tmp_path)
    assert proc.returncode == 2
    assert "site c has 0 training sequences" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_empty_corpus(tmp_path: Path, corpus_file: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n")
    proc = _run_cli("run", str(tiny_job(tmp_path, empty)), cwd=tmp_path)
    assert proc.returncode == 2
    assert "empty" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_missing_job_file(tmp_path: Path) -> None:
    proc = _run_cli("run", str(tmp_path / "nope.toml"), cwd=tmp_path)
    assert proc.returncode == 2 and "job file not found" in proc.stderr


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ('strategy={name="fedopt", optimizer="lamb"}', "strategy.fedopt.optimizer"),
        ('strategy={name="dynamic", alpha=-1}', "strategy.dynamic.alpha"),
        ('strategy={name="dynamic", temperature=0}', "strategy.dynamic.temperature"),
        ('strategy={name="fedopt", nesterov=true}', "nesterov needs"),
        ('strategy={name="krum"}', "does not match any of the expected tags"),
    ],
)
def test_bad_strategy_config_fails_at_load(tmp_path: Path, corpus_file: Path, override: str,
                                           expected: str) -> None:
    with pytest.raises(FedskyError, match=expected):
        load_job(tiny_job(tmp_path, corpus_file), [override])


def test_extends_inherits_and_overrides_a_base(tmp_path: Path, corpus_file: Path) -> None:
    base = tiny_job(tmp_path, corpus_file)
    arm = tmp_path / "arm.toml"
    arm.write_text('extends = "job.toml"\nrounds = 7\n[training]\nlr = 0.05\n'
                   '[strategy]\nname = "fedopt"\noptimizer = "adam"\n')
    job, _ = load_job(arm)
    base_job, _ = load_job(base)
    assert job.rounds == 7 and job.training.lr == 0.05 and job.strategy.name == "fedopt"
    assert job.training.local_steps == base_job.training.local_steps  # inherited
    assert job.sites == base_job.sites
    loop = tmp_path / "loop.toml"
    loop.write_text('extends = "loop.toml"\n')
    with pytest.raises(FedskyError, match="loops back"):
        load_job(loop)


def test_extends_replaces_a_table_of_another_kind(tmp_path: Path, corpus_file: Path) -> None:
    tiny_job(tmp_path, corpus_file, '[strategy]\nname = "fedavg"\nweighting = "uniform"')
    arm = tmp_path / "arm.toml"
    arm.write_text('extends = "job.toml"\n[strategy]\nname = "dynamic"\nrule = "softmax"\n')
    job, _ = load_job(arm)  # fedavg's `weighting` must not leak into dynamic
    assert job.strategy.name == "dynamic" and job.strategy.rule == "softmax"
