"""Bug (Megatron-Bridge #2240's class): the adapter's checkpoint entries ignore tensor parallelism. Its A and
B go through megatron's default for a module without a sharded_state_dict of its own, which takes every
tensor for replicated over TP: each rank's shard is saved as the whole tensor, TP rank 0's copy is the one
that survives, and a model loading it (at any TP > 1, or at TP=1 after a TP=2 save) gets one rank's shard
for all of it."""

import types

from tests.wrong_impls._base import LoRAMerge, VLMLoRA, patched_lora  # noqa: F401


def _as_replicated(self, prefix="", sharded_offsets=(), metadata=None):
    from megatron.core.transformer.utils import sharded_state_dict_default

    out = {}
    for name in ("linear_in", "linear_out"):
        module = getattr(self, name)
        out.update(sharded_state_dict_default(types.SimpleNamespace(state_dict=module.state_dict), f"{prefix}{name}.",
                                              sharded_offsets, metadata))
    return out


def _patch(wrapper, full_name):
    wrapper.adapter.sharded_state_dict = types.MethodType(_as_replicated, wrapper.adapter)


LoRA = patched_lora(_patch)
