"""Bug: the base linear weights of adapted modules are left trainable."""

from tests.wrong_impls._base import LoRAMerge, VLMLoRA, patched_lora  # noqa: F401


def _patch(wrapper, full_name):
    # Freezing happens before wrapping; a buggy wrapper re-enables the base.
    wrapper.to_wrap.weight.requires_grad_(True)


LoRA = patched_lora(_patch)
