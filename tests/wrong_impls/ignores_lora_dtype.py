"""Bug: the parallel path creates adapter parameters in the base dtype, ignoring lora_dtype (a Bridge defect)."""

from tests.wrong_impls._base import LoRAMerge, VLMLoRA, patched_lora  # noqa: F401


def _patch(wrapper, full_name):
    base_dtype = wrapper.to_wrap.weight.dtype
    adapter = wrapper.adapter
    adapter.linear_in.to(base_dtype)
    adapter.linear_out.to(base_dtype)
    adapter.lora_dtype = base_dtype


LoRA = patched_lora(_patch)
