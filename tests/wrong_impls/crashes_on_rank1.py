"""Bug: TP rank 1 dies inside linear_proj's adapter (as a segfault in a custom kernel would)."""

import os
import types

from tests.wrong_impls._base import LoRAMerge, VLMLoRA, patched_lora  # noqa: F401


def _patch(wrapper, full_name):
    adapter = wrapper.adapter
    if adapter.tp_rank == 1 and full_name.endswith("linear_proj"):
        adapter.forward = types.MethodType(lambda self, x: os._exit(17), adapter)


LoRA = patched_lora(_patch)
