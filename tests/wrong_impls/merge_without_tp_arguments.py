"""Bug (of API): LoRAMerge.merge takes no TP arguments, so it cannot merge a tensor-parallel shard."""

from lora.megatron import LoRA, VLMLoRA  # noqa: F401
from lora.megatron import LoRAMerge as _Merge


class LoRAMerge(_Merge):
    def merge(self, base_weight, linear_out, linear_in, alpha, dim):
        return super().merge(base_weight, linear_out, linear_in, alpha, dim, tp_size=1, tp_group=None)
