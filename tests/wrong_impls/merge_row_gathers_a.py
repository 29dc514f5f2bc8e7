"""Bug: a row-parallel merge gathers A along its input dimension instead of gathering B.

Each rank then folds ``B_local @ A_full`` (out/t, in) where its shard of
``W + s B @ A`` is (out, in/t). The column-parallel path is right.
"""

import torch
import torch.distributed as dist

from lora.megatron import LoRA, VLMLoRA  # noqa: F401
from lora.megatron import LoRAMerge as _CorrectMerge

LORA_HARNESS_CAPABILITIES = {"contract": "strict", "experts": True}


class LoRAMerge(_CorrectMerge):
    def merge(self, base_weight, linear_out, linear_in, alpha, dim, *, tp_size=1, tp_group=None):
        row = tp_size > 1 and linear_out.shape[0] * tp_size == base_weight.shape[0]
        if not row:
            return super().merge(base_weight, linear_out, linear_in, alpha, dim, tp_size=tp_size, tp_group=tp_group)
        pieces = [torch.empty_like(linear_in) for _ in range(tp_size)]
        dist.all_gather(pieces, linear_in.contiguous(), group=tp_group)
        a_full = torch.cat(pieces, dim=1)
        delta = (alpha / dim) * (linear_out.float() @ a_full.float())
        # Fold the rank's (out/t, in) product into its own rows of the (out, in/t) shard's slice.
        out_t, in_t = linear_out.shape[0], base_weight.shape[1]
        rank = dist.get_rank(tp_group)
        merged = base_weight.float().clone()
        merged[rank * out_t:(rank + 1) * out_t] += delta[:, rank * in_t:(rank + 1) * in_t]
        return merged.to(base_weight.dtype)
