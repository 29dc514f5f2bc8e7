"""Bug: LoRAMerge folds B @ A into the base weight without the alpha / dim scale."""

from lora.megatron import LoRA, VLMLoRA  # noqa: F401
from lora.megatron import LoRAMerge as _CorrectMerge

LORA_HARNESS_CAPABILITIES = {"contract": "strict", "experts": True}


class LoRAMerge(_CorrectMerge):
    def merge(self, base_weight, linear_out, linear_in, alpha, dim, *, tp_size=1, tp_group=None):
        return super().merge(base_weight, linear_out, linear_in, dim, dim, tp_size=tp_size, tp_group=tp_group)
