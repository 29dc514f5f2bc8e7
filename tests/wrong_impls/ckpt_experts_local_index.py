"""Bug (the class Megatron-Bridge #3951 fixed for per-expert LoRA, and #5379 for shared adapters: a reshard
that keeps one EP rank's values): a grouped linear's per-expert adapters are saved at their *local* expert
index, and every EP rank but the first marks its pieces as replicas of EP rank 0's. At EP=1 nothing
changes; at EP=2 the checkpoint holds EP rank 0's experts only, half the experts' adapters, and a model
loading it gets rank 0's adapters for every expert, or finds the entries too small."""

import types

import lora.megatron.expert_checkpoint as ea
from tests.wrong_impls._experts import LORA_HARNESS_CAPABILITIES, LoRAMerge, VLMLoRA, patched_expert_lora  # noqa: F401


def _patch(wrapper, full_name):
    adapter = wrapper.adapter
    if not adapter.per_expert:
        return
    ep_rank = ea.group_rank(ea.expert_model_parallel_group())

    def local_index(self, prefix="", sharded_offsets=(), metadata=None):
        real = ea.expert_model_parallel_group
        ea.expert_model_parallel_group = lambda: None  # size 1, rank 0: the local index is the "global" one
        try:
            out = ea.expert_entries(self, prefix, sharded_offsets, metadata)
        finally:
            ea.expert_model_parallel_group = real
        for value in out.values():
            value.replica_id = (0, ep_rank, value.replica_id[2])
        return out

    adapter.sharded_state_dict = types.MethodType(local_index, adapter)


LoRA = patched_expert_lora(_patch)
