"""A correct LoRA without the switch methods that says so: ``adapter_switch: False`` (the property is skipped)."""

from tests.wrong_impls.switch_missing import LoRA, LoRAMerge, VLMLoRA  # noqa: F401

LORA_HARNESS_CAPABILITIES = {"adapter_switch": False}
