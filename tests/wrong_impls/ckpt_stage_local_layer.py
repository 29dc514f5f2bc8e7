"""Bug: an adapter's checkpoint entry is keyed by its layer's index inside the pipeline stage (the local
``decoder.layers.<i>`` name) instead of the layer's global number. At PP=1 the two agree; at PP=2 the first
layer of every stage writes the same entry, so one stage's adapters overwrite (or collide with) another's and
a model without stages finds no entry for the others."""

import re
import types

from tests.wrong_impls._base import LoRAMerge, VLMLoRA, patched_lora  # noqa: F401

#: Only pipeline layouts show it (benchmarks/detection.py runs it with --pp 2).
PIPELINE_BUG = True


def _patch(wrapper, full_name):
    original = wrapper.adapter.sharded_state_dict

    def local_layer(self, prefix="", sharded_offsets=(), metadata=None):
        found = list(re.finditer(r"(?:^|\.)layers\.(\d+)\.", prefix))
        if found and len(sharded_offsets) == 1:
            axis, _, count = sharded_offsets[0]
            sharded_offsets = ((axis, int(found[-1].group(1)), count),)
        return original(prefix, sharded_offsets, metadata)

    wrapper.adapter.sharded_state_dict = types.MethodType(local_layer, wrapper.adapter)


LoRA = patched_lora(_patch)
