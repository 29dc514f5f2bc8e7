#!/usr/bin/env bash
# What CI runs: the README's commands exactly as written, read from README.md
# (its first ```bash block, every line in one shell, as a user pastes them),
# then a check that no rank process outlived them. Nothing here is a copy of
# those commands, so CI cannot drift from what the README tells a user.
set -euo pipefail
cd "$(dirname "$0")/.."
block=$(bash ci/readme_commands.sh)
before=$(pgrep -fc 'multiprocessing' || true)
echo "ci/test.sh: running the README's commands:"
printf '%s\n' "$block" | sed 's/^/  $ /'
bash -euo pipefail -c "$block"
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
