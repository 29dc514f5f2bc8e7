#!/usr/bin/env bash
# What CI runs after ci/setup.sh: the main job, then the README's test command.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
before=$(pgrep -fc 'multiprocessing' || true)
# The main job, kept short in CI (the pytest run below is the full check).
lora-harness verify --tp 2 --examples 4
pytest -n auto --tp 2 --ep 2
# A fork server exits on its own once its owner is gone; give it a moment.
for _ in $(seq 1 50); do
  after=$(pgrep -fc 'multiprocessing' || true)
  [ "${after:-0}" -le "${before:-0}" ] && break
  sleep 0.2
done
echo "multiprocessing processes before: ${before:-0}, after: ${after:-0}"
if [ "${after:-0}" -gt "${before:-0}" ]; then
  echo "ci/test.sh: rank processes outlived the run:" >&2
  pgrep -fa multiprocessing >&2 || true
  exit 1
fi
