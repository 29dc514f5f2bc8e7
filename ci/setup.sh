#!/usr/bin/env bash
# Create .venv with Python 3.12 and install the project with its test extra at CI's pinned versions.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash ci/find_python.sh)
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
  rm -rf .venv
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -c ci/constraints.txt -e '.[test]'
.venv/bin/python -c 'import torch, megatron.core; print("torch", torch.__version__, "megatron-core", megatron.core.__version__)'
