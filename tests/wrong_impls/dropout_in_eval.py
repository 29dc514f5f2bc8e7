"""Bug: the adapter's dropout ignores the module's mode and drops in eval (``training=True`` hard-coded)."""

from lora.megatron.wrapper import apply_dropout
from tests.wrong_impls._base import LoRAMerge, VLMLoRA, patched_lora  # noqa: F401


def _patch(wrapper, full_name):
    adapter = wrapper.adapter
    adapter._dropout = lambda x, sharded: apply_dropout(x, adapter.dropout, True) if adapter.dropout > 0 else x


LoRA = patched_lora(_patch)
