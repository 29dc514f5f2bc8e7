"""Bug: LoRAMerge treats every shard as a whole matrix (no gather over the TP group)."""

from lora.megatron import LoRA, VLMLoRA  # noqa: F401
from lora.megatron import LoRAMerge as _CorrectMerge

LORA_HARNESS_CAPABILITIES = {"contract": "strict", "experts": True}


class LoRAMerge(_CorrectMerge):
    def merge(self, base_weight, linear_out, linear_in, alpha, dim, *, tp_size=1, tp_group=None):
        return super().merge(base_weight, linear_out, linear_in, alpha, dim, tp_size=1, tp_group=None)
