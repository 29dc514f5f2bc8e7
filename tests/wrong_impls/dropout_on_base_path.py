"""Bug: the wrapper drops its input before the base layer too, so the frozen base sees the adapter's dropout."""

import types

from lora.megatron.wrapper import apply_dropout
from tests.wrong_impls._base import LoRAMerge, VLMLoRA, patched_lora  # noqa: F401


def _patch(wrapper, full_name):
    original = wrapper.forward
    p = wrapper.adapter.dropout

    def forward(self, x, *args, **kwargs):
        return original(apply_dropout(x, p, self.training), *args, **kwargs)

    wrapper.forward = types.MethodType(forward, wrapper)


LoRA = patched_lora(_patch)
