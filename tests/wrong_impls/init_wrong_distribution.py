"""Bug: "xavier" is drawn with ``xavier_uniform_`` (uniform, the same std) instead of Xavier normal.

Drawn over the full matrix and sharded like lora.megatron, so the initial
adapter is the same at every layout: ``init_matches_layouts`` cannot see
it, at any TP. Only a test of the distribution itself can.
"""

from tests.wrong_impls._base import LoRAMerge, VLMLoRA, patched_lora  # noqa: F401


def _uniform_for_xavier(method):
    return "xavier_uniform" if method == "xavier" else method


def _patch(wrapper, full_name):
    adapter = wrapper.adapter
    draw = adapter.reset_parameters

    def reset_parameters(a_method, b_method, generator=None):
        draw(_uniform_for_xavier(a_method), _uniform_for_xavier(b_method), generator)

    adapter.reset_parameters = reset_parameters


LoRA = patched_lora(_patch, after_init=True)
