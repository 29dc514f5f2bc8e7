#!/usr/bin/env bash
# Print the README's commands: the lines of README.md's first ```bash block.
set -euo pipefail
cd "$(dirname "$0")/.."
block=$(awk '/^```bash[[:space:]]*$/ {inside = 1; next} inside && /^```/ {exit} inside {print}' README.md)
if [ -z "$block" ]; then
  echo "ci/readme_commands.sh: README.md has no \`\`\`bash block of commands" >&2
  exit 1
fi
printf '%s\n' "$block"
