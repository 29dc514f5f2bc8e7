"""Bug: the a2a_experimental path hands each TP rank the other rank's sequence chunk
(the all-to-all's chunks taken in the wrong order)."""

import types

import torch

from tests.wrong_impls._base import LoRAMerge, VLMLoRA, patched_lora  # noqa: F401


def _patch(wrapper, full_name):
    adapter = wrapper.adapter
    if adapter.kind != "row":
        return
    to_shard = adapter._to_sequence_shard

    def permuted(self, out):
        if not self.a2a:
            return to_shard(out)
        # Rotate the sequence by one chunk before the exchange: rank r receives chunk r+1.
        s = out.shape[0]
        return to_shard(torch.roll(out, shifts=-(s // self.tp_size), dims=0))

    adapter._to_sequence_shard = types.MethodType(permuted, adapter)


LoRA = patched_lora(_patch)
