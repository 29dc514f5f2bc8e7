"""Bug: a2a_experimental is accepted and ignored: row-parallel adapters under sequence parallelism
still gather B's output and scatter it along the sequence. The numbers are right; the all-to-all
SPEC asks for (to save the gather's memory and traffic) never happens."""

from tests.wrong_impls._base import LoRAMerge, VLMLoRA, patched_lora  # noqa: F401


def _patch(wrapper, full_name):
    adapter = wrapper.adapter
    if adapter.kind == "row" and adapter.a2a:
        adapter.a2a = False
        adapter.linear_out.gather_output = True


LoRA = patched_lora(_patch)
