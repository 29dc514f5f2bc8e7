"""Implementations that are correct under a contract other than our SPEC (e.g. Megatron-Bridge's)."""
