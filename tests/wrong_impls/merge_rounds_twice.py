"""Bug: the merge computes the delta in the base weight's dtype and adds it there, rounding twice (Bridge's way).

Exact in float32/float64 models; a bfloat16 base shows it.
"""

import torch

from lora.megatron import LoRA, VLMLoRA  # noqa: F401
from lora.megatron import LoRAMerge as _CorrectMerge

LORA_HARNESS_CAPABILITIES = {"contract": "strict", "experts": True}


class LoRAMerge(_CorrectMerge):
    def merge(self, base_weight, linear_out, linear_in, alpha, dim, *, tp_size=1, tp_group=None):
        dt = base_weight.dtype
        if dt not in (torch.bfloat16, torch.float16):
            return super().merge(base_weight, linear_out, linear_in, alpha, dim, tp_size=tp_size, tp_group=tp_group)
        zero = torch.zeros_like(base_weight, dtype=torch.float32)
        delta = super().merge(zero, linear_out.float(), linear_in.float(), alpha, dim, tp_size=tp_size, tp_group=tp_group)
        return base_weight + delta.to(dt)
