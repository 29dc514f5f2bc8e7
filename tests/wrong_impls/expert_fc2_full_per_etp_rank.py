"""Bug: an expert fc2 (row) adapter gathers its delta to full width on every expert-TP rank.

The token dispatcher then sums the expert outputs over ETP, so the delta is
counted ETP times (the base's output there is a partial sum; the adapter's
must be one too).
"""

import types

from tests.wrong_impls._experts import LORA_HARNESS_CAPABILITIES, LoRAMerge, VLMLoRA, patched_expert_lora  # noqa: F401


def _full_width(self, out):
    if self.kind == "column" or self.etp_size == 1:
        return out
    from megatron.core.tensor_parallel import mappings

    return mappings.gather_from_tensor_model_parallel_region(out, group=self.etp_group)


def _patch(wrapper, full_name):
    wrapper.adapter._to_base_layout = types.MethodType(_full_width, wrapper.adapter)


LoRA = patched_expert_lora(_patch)
