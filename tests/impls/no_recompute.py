"""A LoRA that says it does not support training under activation recompute: ``recompute: False`` (the property is skipped)."""

from tests.wrong_impls.recompute_frozen_input import LoRA, LoRAMerge, VLMLoRA  # noqa: F401

LORA_HARNESS_CAPABILITIES = {"recompute": False}
