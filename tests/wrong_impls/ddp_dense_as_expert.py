"""Bug: dense adapters flagged as expert parameters (``allreduce = False``): megatron-core's DDP puts them in
its expert buffers and reduces their gradients over the expert-data-parallel group, which at EP > 1 is
smaller than the dense data-parallel group, so the dense replicas train on their own data only and drift
apart (the mirror of Megatron-Bridge #5231, where grouped-expert adapters were reduced over dense DP).
Only a run under megatron's own DDP sees it."""

from tests.wrong_impls._base import LoRAMerge, VLMLoRA, patched_lora  # noqa: F401


def _patch(wrapper, full_name):
    for p in wrapper.adapter.parameters():
        p.allreduce = False


LoRA = patched_lora(_patch)
