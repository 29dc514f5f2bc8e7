"""Bug: a grouped linear's shared adapter is initialised on each EP rank from its own generator (no broadcast)."""

import torch

from tests.wrong_impls._experts import LORA_HARNESS_CAPABILITIES, LoRAMerge, VLMLoRA, patched_expert_lora  # noqa: F401


def _patch(wrapper, full_name):
    from megatron.core import parallel_state

    adapter = wrapper.adapter
    if adapter.per_expert:
        return
    gen = torch.Generator().manual_seed(1234 + parallel_state.get_expert_model_parallel_rank())
    adapter.load_full(*adapter.draw_full(generator=gen))


LoRA = patched_expert_lora(_patch)
