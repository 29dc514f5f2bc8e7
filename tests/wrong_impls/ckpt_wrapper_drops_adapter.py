"""Bug (Megatron-Bridge #5310's class): the adapted module's sharded_state_dict is its base layer's alone (a
wrapper that forwards unknown attributes to the base layer, and no sharded_state_dict of its own): the
adapters never reach the checkpoint, and a model loading it keeps whatever adapters it started with."""

from tests.wrong_impls._base import LoRAMerge, VLMLoRA, patched_lora  # noqa: F401


def _patch(wrapper, full_name):
    wrapper.sharded_state_dict = wrapper.to_wrap.sharded_state_dict


LoRA = patched_lora(_patch)
