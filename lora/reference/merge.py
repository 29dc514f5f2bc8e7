"""The reference's merge: folding adapters into base weights on one device.

`LoRAMerge.merge` is the weight formula, base + (alpha/dim) * B @ A in float32
(float64 for a float64 base), cast once to the base's dtype; calling a
`LoRAMerge` on a model (`merge_lora`) replaces every adapter wrapper by its
base layer holding the merged weight (a grouped expert linear: every
`weight{i}`). Sharded weights (TP size > 1) are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from lora.reference.adapters import LoRAExpertAdapters
from lora.reference.layers import _grouped_tp_size, _grouped_weights, _tp_group_size
from lora.reference.walk import _model_chunks, _replace_modules, _same_container


@dataclass
class LoRAMerge:
    """Folds adapters into base weights on one device.

    `merge(...)` is the weight formula; calling the object on a model (or
    `merge_lora(model)`) replaces every adapter wrapper by its base layer,
    whose weight now holds base + (alpha/dim) * B @ A (a grouped expert
    linear: each `weight{i}` gets B_i @ A_i, or the shared B @ A), so the returned model's
    forward equals the adapted forward in eval mode (dropout off). Base
    weights are updated in place: the returned model shares its layers with
    the input.
    """

    def merge(
        self,
        base_weight: torch.Tensor,
        linear_out: torch.Tensor,
        linear_in: torch.Tensor,
        alpha: float,
        dim: int,
        *,
        tp_size: int = 1,
        tp_group: Any = None,
    ) -> torch.Tensor:
        """base_weight + (alpha/dim) * linear_out @ linear_in, in float32 (float64 for a float64 base), cast once."""
        if tp_size != 1:
            raise ValueError(
                f"LoRAMerge.merge got tp_size={tp_size}; the reference merge is single-device "
                "(tp_size=1): use lora.megatron's LoRAMerge for sharded weights"
            )
        if base_weight.dim() != 2 or linear_out.dim() != 2 or linear_in.dim() != 2:
            raise ValueError(
                f"LoRAMerge.merge needs 2-D tensors, got base {tuple(base_weight.shape)}, "
                f"linear_out {tuple(linear_out.shape)}, linear_in {tuple(linear_in.shape)}"
            )
        out_features, in_features = base_weight.shape
        if linear_out.shape[1] != linear_in.shape[0] or linear_out.shape[0] != out_features or linear_in.shape[1] != in_features:
            raise ValueError(
                f"LoRAMerge.merge: base {tuple(base_weight.shape)} does not equal linear_out "
                f"{tuple(linear_out.shape)} @ linear_in {tuple(linear_in.shape)} in shape"
            )
        compute = torch.float64 if base_weight.dtype == torch.float64 else torch.float32
        B = linear_out.to(device=base_weight.device, dtype=compute)
        A = linear_in.to(device=base_weight.device, dtype=compute)
        merged = base_weight.to(compute) + (alpha / dim) * (B @ A)
        return merged.to(base_weight.dtype)

    @torch.no_grad()
    def transform(self, module: nn.Module, name: Optional[str] = None, prefix: Optional[str] = None) -> nn.Module:
        """The base layer with the adapter folded in, for an adapter wrapper; anything else unchanged."""
        if not (hasattr(module, "to_wrap") and hasattr(module, "adapter")):
            return module
        base = module.to_wrap
        adapter = module.adapter
        grouped = _grouped_weights(base)
        if grouped is not None:
            tp_size = _grouped_tp_size(base)
            for i, weight in enumerate(grouped):
                if isinstance(adapter, LoRAExpertAdapters):
                    B = getattr(adapter.linear_out, f"weight{i}")
                    A = getattr(adapter.linear_in, f"weight{i}")
                else:
                    B = adapter.linear_out.weight
                    A = adapter.linear_in.weight
                weight.copy_(self.merge(weight, B, A, adapter.alpha, adapter.dim, tp_size=tp_size))
            return base
        merged = self.merge(
            base.weight,
            adapter.linear_out.weight,
            adapter.linear_in.weight,
            adapter.alpha,
            adapter.dim,
            tp_size=_tp_group_size(base),
        )
        base.weight.copy_(merged)
        return base

    def __call__(self, model: Any) -> Any:
        merged_chunks = [_replace_modules(chunk, self.transform) for chunk in _model_chunks(model)]
        return _same_container(model, merged_chunks)


def merge_lora(model: Any) -> Any:
    """Fold every adapter of a reference-LoRA model into its base weight; returns plain base layers."""
    return LoRAMerge()(model)
