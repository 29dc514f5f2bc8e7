"""Bug: init draws A and B over the local shard's shape (fans on the shard), as Megatron-Bridge does.

Correct at TP=1; at TP>1 the initial adapter depends on the layout.
"""

import torch

from lora.megatron.init import init_full_weight
from tests.wrong_impls._base import LoRAMerge, VLMLoRA, patched_lora  # noqa: F401


def _patch(wrapper, full_name):
    adapter = wrapper.adapter

    @torch.no_grad()
    def reset_parameters(a_method, b_method, generator=None):
        for which, method in (("linear_in", a_method), ("linear_out", b_method)):
            weight = getattr(adapter, which).weight
            weight.copy_(init_full_weight(tuple(weight.shape), method, generator=generator).to(weight.dtype))

    adapter.reset_parameters = reset_parameters


LoRA = patched_lora(_patch, after_init=True)
