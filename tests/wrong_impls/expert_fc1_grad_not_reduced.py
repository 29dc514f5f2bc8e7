"""Bug: an expert adapter's dL/dh is not summed over the expert-TP group.

B's (out/t, r) shard sees only its rows, so the gradient reaching A is a
partial sum. The forward is exact; A's gradient misses the other ranks' terms.
"""

import types

from tests.wrong_impls._experts import LORA_HARNESS_CAPABILITIES, LoRAMerge, VLMLoRA, patched_expert_lora  # noqa: F401


def _patch(wrapper, full_name):
    wrapper.adapter._complete_rank_grad = types.MethodType(lambda self, h: h, wrapper.adapter)


LoRA = patched_expert_lora(_patch)
