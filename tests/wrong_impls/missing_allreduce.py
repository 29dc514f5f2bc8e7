"""Bug: a row-parallel base's A output is not all-reduced over TP (each rank keeps its partial sum)."""

import types

import torch

from tests.wrong_impls._base import LoRAMerge, VLMLoRA, patched_lora  # noqa: F401


def _patch(wrapper, full_name):
    adapter = wrapper.adapter
    if adapter.kind != "row":
        return
    linear_in = adapter.linear_in
    linear_in.forward = types.MethodType(lambda self, x: (torch.matmul(x, self.weight.t()), None), linear_in)


LoRA = patched_lora(_patch)
