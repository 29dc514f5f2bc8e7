"""An implementation module that fails at import: the harness must say so in one line, exit 2."""

RATIO = 1 / 0
