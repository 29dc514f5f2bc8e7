"""Bug: for a gated linear_fc1 the adapter's local output is [up; gate] instead of [gate; up]."""

import types

import torch

from tests.wrong_impls._base import LoRAMerge, VLMLoRA, patched_lora  # noqa: F401


def _patch(wrapper, full_name):
    adapter = wrapper.adapter
    if not adapter.gated:
        return
    original = adapter.forward

    def forward(self, x):
        gate, up = torch.chunk(original(x), 2, dim=-1)
        return torch.cat([up, gate], dim=-1)

    adapter.forward = types.MethodType(forward, adapter)


LoRA = patched_lora(_patch)
