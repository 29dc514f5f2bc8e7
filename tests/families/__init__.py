"""Test-only model families (``toy``: the README's worked example of adding a family)."""
