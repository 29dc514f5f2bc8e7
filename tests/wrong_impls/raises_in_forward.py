"""Bug: TP rank 1 raises inside linear_proj's adapter while rank 0 waits in a collective."""

import types

from tests.wrong_impls._base import LoRAMerge, VLMLoRA, patched_lora  # noqa: F401


def _patch(wrapper, full_name):
    adapter = wrapper.adapter
    if adapter.tp_rank == 1 and full_name.endswith("linear_proj"):
        def forward(self, x):
            raise RuntimeError("custom kernel failed on rank 1")

        adapter.forward = types.MethodType(forward, adapter)


LoRA = patched_lora(_patch)
