"""Deliberately wrong LoRA implementations, each with one realistic sharding bug.

Every module exposes ``LoRA``, ``VLMLoRA`` and ``LoRAMerge`` like a real
implementation (``--lora-impl tests.wrong_impls.NAME``). The harness's own
tests feed them to each property and expect a failure with a minimal example:
a property that cannot fail is a defect.
"""
