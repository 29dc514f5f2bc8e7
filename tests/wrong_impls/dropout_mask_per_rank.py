"""Bug: every adapter dropout draws from the model-parallel RNG stream, which differs per TP rank,
even on a tensor that is the same on every rank (a column base's input without sequence parallelism):
each rank then drops different elements of what is one replicated activation."""

from lora.megatron.wrapper import apply_dropout
from tests.wrong_impls._base import LoRAMerge, VLMLoRA, patched_lora  # noqa: F401


def _patch(wrapper, full_name):
    adapter = wrapper.adapter

    def dropout(x, sharded):
        if adapter.dropout == 0.0 or not adapter.training:
            return x
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        with get_cuda_rng_tracker().fork():
            return apply_dropout(x, adapter.dropout, True)

    adapter._dropout = dropout


LoRA = patched_lora(_patch)
