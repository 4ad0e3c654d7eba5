#!/usr/bin/env bash
# Regenerate the committed gRPC stubs from src/fedsky/transport/fedsky.proto.
#
# Usage: scripts/gen_proto.sh [OUT_DIR]   (relative to the repo root; default src, which
# overwrites the committed stubs)
# Generating from `-I src` with the package path makes the grpc stub import its messages as
# `from fedsky.transport import fedsky_pb2`, which works inside the installed package.
# tests/test_grpc_transport.py runs this into a temp dir and diffs against the committed files.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-src}"
mkdir -p "$out"
# $PYTHON if set, else the project virtualenv (what `make proto` builds), else python3.
if [[ -z "${PYTHON:-}" && -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; fi
"${PYTHON:-python3}" -m grpc_tools.protoc -I src \
  --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  fedsky/transport/fedsky.proto
