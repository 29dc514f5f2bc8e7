"""Bug: the merge takes r from the local shard of A, so a column-parallel fold at TP=t is scaled by alpha / (r / t)."""

from lora.megatron import LoRA, VLMLoRA  # noqa: F401
from lora.megatron import LoRAMerge as _CorrectMerge

LORA_HARNESS_CAPABILITIES = {"contract": "strict", "experts": True}


class LoRAMerge(_CorrectMerge):
    def merge(self, base_weight, linear_out, linear_in, alpha, dim, *, tp_size=1, tp_group=None):
        local_dim = linear_in.shape[0]
        return super().merge(base_weight, linear_out, linear_in, alpha * dim / local_dim, dim,
                             tp_size=tp_size, tp_group=tp_group)
