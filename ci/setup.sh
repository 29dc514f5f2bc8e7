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
# Bytecode for the project's own modules: with PYTHONDONTWRITEBYTECODE set (as on
# CI's machines) every test subprocess and rank pool would compile them again.
.venv/bin/python -m compileall -q harness lora tests >/dev/null
# Megatron-Bridge's LoRA, judged by the harness in CI (tests/bridge/test_bridge_golden.py):
# its own dependencies are GPU and training packages the peft LoRA does not use.
.venv/bin/python -m pip install --quiet --no-deps -c ci/constraints.txt megatron-bridge
.venv/bin/python -W ignore -c 'import logging; logging.disable(logging.WARNING); import torch, megatron.core; print("torch", torch.__version__, "megatron-core", megatron.core.__version__)'
# Headless Chromium for the report's browser test (tests/frontends/test_report.py fails without it under CI=true).
if ! command -v chromium >/dev/null; then (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) || echo "ci/setup.sh: could not install chromium; the report browser test will fail under CI" >&2; fi
