"""Bug: under sequence parallelism a row adapter's full output is reduce-scattered like the base's
partial sums, instead of split: the delta is counted once per TP rank (t times too large)."""

import types

from tests.wrong_impls._base import LoRAMerge, VLMLoRA, patched_lora  # noqa: F401


def _patch(wrapper, full_name):
    adapter = wrapper.adapter
    if adapter.kind == "row" and not adapter.a2a:
        def to_shard(self, out):
            from megatron.core.tensor_parallel import mappings

            return mappings.reduce_scatter_to_sequence_parallel_region(out, group=self.tp_group)

        adapter._to_sequence_shard = types.MethodType(to_shard, adapter)


LoRA = patched_lora(_patch)
