"""Bug: the adapter never applies its dropout (the probability is stored, the branch is the identity)."""

from tests.wrong_impls._base import LoRAMerge, VLMLoRA, patched_lora  # noqa: F401


def _patch(wrapper, full_name):
    wrapper.adapter._dropout = lambda x, sharded: x


LoRA = patched_lora(_patch)
