"""Bug: a gradient hook zeroes B's gradient on TP rank 0 (e.g. a stale grad-accumulation buffer)."""

from tests.wrong_impls._base import LoRAMerge, VLMLoRA, patched_lora  # noqa: F401


def _patch(wrapper, full_name):
    adapter = wrapper.adapter
    if adapter.tp_rank == 0 and adapter.tp_size > 1:
        adapter.linear_out.weight.register_hook(lambda g: g * 0)


LoRA = patched_lora(_patch)
