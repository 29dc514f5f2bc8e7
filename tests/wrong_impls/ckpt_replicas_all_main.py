"""Bug: every rank marks its copy of an adapter tensor as the main replica (replica_id 0 everywhere), so a
tensor replicated over data parallelism is saved once per rank: duplicate entries, which megatron-core's
save refuses (or, where it would not check, one rank's copy overwrites another's)."""

import types

from tests.wrong_impls._base import LoRAMerge, VLMLoRA, patched_lora  # noqa: F401


def _patch(wrapper, full_name):
    adapter = wrapper.adapter
    own = type(adapter).sharded_state_dict

    def every_rank_main(self, prefix="", sharded_offsets=(), metadata=None):
        out = own(self, prefix, sharded_offsets, metadata)
        for value in out.values():
            if hasattr(value, "replica_id"):  # ShardedTensor, ShardedObject, factories
                value.replica_id = 0
        return out

    adapter.sharded_state_dict = types.MethodType(every_rank_main, adapter)


LoRA = patched_lora(_patch)
