"""Bug: the adapters' weight-gradient path assigns ``.grad`` instead of adding to it.

One micro-batch is exactly right; with gradient accumulation over two,
only the last micro-batch's gradient is left.
"""

import torch

from tests.wrong_impls._base import LoRAMerge, VLMLoRA, patched_lora  # noqa: F401


def _assign_instead_of_add(param):
    last = {}

    def hook(p):
        # .grad now holds (previous + this backward's); keep only this backward's.
        previous = last.get("grad")
        if previous is not None:
            p.grad.sub_(previous)
        last["grad"] = p.grad.detach().clone()

    param.register_post_accumulate_grad_hook(hook)


def _patch(wrapper, full_name):
    for matrix in (wrapper.adapter.linear_in, wrapper.adapter.linear_out):
        _assign_instead_of_add(matrix.weight)


LoRA = patched_lora(_patch)
