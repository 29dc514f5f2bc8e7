"""The front ends: CLI, pytest plugin, the README's downstream file and commands, bad input, regressions, reports."""
