"""Bug: expert adapters ignore lora_A_init_method and draw A with Kaiming uniform (the expert path's
own default), over the full matrix and the same at every layout: init_matches_layouts cannot see it,
and the dense adapters are right."""

from tests.wrong_impls._experts import LoRAMerge, VLMLoRA, patched_expert_lora  # noqa: F401

LORA_HARNESS_CAPABILITIES = {"contract": "strict", "experts": True}


def _patch(wrapper, full_name):
    adapter = wrapper.adapter
    a_method, b_method = adapter.init_methods
    if a_method == "kaiming":
        return
    adapter.init_methods = ("kaiming", b_method)
    count = adapter.linear_in.count
    for i in [None] if count is None else range(count):
        adapter.load_full(*adapter.draw_full(), i=i)


LoRA = patched_expert_lora(_patch)
