"""Bug: B's input gradient is not summed over TP (a copy-to-region whose backward drops the other ranks' terms).

The forward is exactly right; only gradients reaching A (and the input)
through the adapter are wrong at TP > 1.
"""

import types

from tests.wrong_impls._base import LoRAMerge, VLMLoRA, patched_lora  # noqa: F401


def _patch(wrapper, full_name):
    linear_out = wrapper.adapter.linear_out
    # With both off, megatron neither wraps the input in a copy-to-region
    # nor all-reduces the input gradient inside its linear autograd function.
    linear_out.disable_grad_reduce = True
    linear_out.allreduce_dgrad = False


LoRA = patched_lora(_patch)
