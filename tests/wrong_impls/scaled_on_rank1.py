"""Bug: the adapter output is scaled by 1.5 on TP rank 1 only (e.g. alpha/r computed from a local shard)."""

import types

from tests.wrong_impls._base import LoRAMerge, VLMLoRA, patched_lora  # noqa: F401


def _patch(wrapper, full_name):
    adapter = wrapper.adapter
    if adapter.tp_rank == 1:
        original = adapter.forward
        adapter.forward = types.MethodType(lambda self, x: original(x) * 1.5, adapter)


LoRA = patched_lora(_patch)
