#!/usr/bin/env bash
# Print the path of a working Python 3.12 interpreter, or fail saying where we looked.
set -u
for cand in python3.12 /usr/bin/python3.12 /usr/local/bin/python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12 /root/.pyenv/versions/3.12*/bin/python3.12; do
  if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1; then
    command -v "$cand"
    exit 0
  fi
done
echo "ci/find_python.sh: no working python3.12 found (tried PATH, /usr/bin, /usr/local/bin, ~/.pyenv/versions/3.12*)" >&2
exit 1
