"""Megatron-Bridge judged by the harness: its import on CPU and the golden table of what the harness finds."""
