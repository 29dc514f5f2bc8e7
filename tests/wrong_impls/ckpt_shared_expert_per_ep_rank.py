"""Bug: a grouped linear's shared expert adapter, the same tensor on every EP rank, is saved by every EP rank
as its main replica (the replica id ignores the EP rank, as if the adapter were split over EP). megatron-core
refuses the checkpoint at EP=2 (one piece with two main replicas); at EP=1 nothing changes."""

import types

import lora.megatron.expert_checkpoint as ea
from tests.wrong_impls._experts import LORA_HARNESS_CAPABILITIES, LoRAMerge, VLMLoRA, patched_expert_lora  # noqa: F401


def _patch(wrapper, full_name):
    adapter = wrapper.adapter
    if adapter.per_expert:
        return

    def every_ep_rank(self, prefix="", sharded_offsets=(), metadata=None):
        out = ea.expert_entries(self, prefix, sharded_offsets, metadata)
        for value in out.values():
            value.replica_id = (0, 0, value.replica_id[2])
        return out

    adapter.sharded_state_dict = types.MethodType(every_ep_rank, adapter)


LoRA = patched_expert_lora(_patch)
