"""Single-device reference LoRA: the numbers every sharded implementation must reproduce.

Plain torch, no process groups of its own. It adapts `torch.nn.Linear` and
megatron-core `ColumnParallelLinear` / `RowParallelLinear` whose TP group has
size 1 (a layer of a TP-sharded model is a `ValueError`: use `lora.megatron`);
any other selected module is a `TypeError`.

    y' = base(x) + (alpha / r) * Dpost(B(A(Dpre(x))))

The adapter computes in lora_dtype (or the base weight's dtype) and its result
is cast to the base output's dtype before the sum.

Fields the reference accepts but that have nothing to act on here:
- `a2a_experimental`: only changes communication under sequence parallelism;
  a no-op on one device.
- `share_expert_adapters`: only concerns grouped expert linears, which the
  reference does not adapt (every expert module it sees gets its own adapter,
  which is what sharing means for one expert per module).
- `normalize_moe_lora`: honoured. A module whose full name lies under
  `...mlp.experts...` gets rank `dim // moe_router_topk`, topk read from the
  module's or the model's `.config`; missing topk or a dim not divisible by it
  is a `ValueError`. alpha is unchanged, so the scale is alpha / (dim // topk).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lora._common import (
    AdapterWrapper,
    LoRABase,
    VLMFreezeMixin,
    apply_dropout,
    init_adapter_weights,
    is_adapter_wrapper,
    join_name,
    merge_weight,
    walk_and_replace,
)

__all__ = ["LoRA", "VLMLoRA", "LoRAMerge", "LoRALinear", "LoRAAdapter", "merge_lora"]

_MEGATRON_LAYERS_MODULE = "megatron.core.tensor_parallel.layers"


class LoRAAdapter(nn.Module):
    """The adapter branch: scale * Dpost(B(A(Dpre(x)))) in the adapter's dtype.

    `linear_in` is A (in -> r), `linear_out` is B (r -> out), neither with a
    bias. `dim` is the rank r and `alpha` the scale numerator.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        dim: int,
        *,
        alpha: float,
        dropout: float = 0.0,
        dropout_position: str = "pre",
        lora_A_init_method: str = "xavier",
        lora_B_init_method: str = "zero",
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        # skip_init: nn.Linear's own init would consume RNG draws and shift
        # every later adapter away from what a sharded implementation draws.
        self.linear_in = nn.utils.skip_init(nn.Linear, in_features, dim, bias=False, dtype=dtype, device=device)
        self.linear_out = nn.utils.skip_init(nn.Linear, dim, out_features, bias=False, dtype=dtype, device=device)
        a, b = init_adapter_weights(
            out_features, in_features, dim, lora_A_init_method, lora_B_init_method, dtype=dtype, device=device
        )
        with torch.no_grad():
            self.linear_in.weight.copy_(a)
            self.linear_out.weight.copy_(b)
        self.dim = dim
        self.alpha = alpha
        self.dropout = dropout
        self.dropout_position = dropout_position

    @property
    def scale(self) -> float:
        return self.alpha / self.dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(self.linear_in.weight.dtype)
        if self.dropout_position == "pre":
            h = apply_dropout(h, self.dropout, self.training)
        h = self.linear_out(self.linear_in(h))
        if self.dropout_position == "post":
            h = apply_dropout(h, self.dropout, self.training)
        return h * self.scale

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, alpha={self.alpha}, dropout={self.dropout}, "
            f"dropout_position={self.dropout_position!r}"
        )


class LoRALinear(AdapterWrapper):
    """A base linear (`to_wrap`) plus its `LoRAAdapter` (`adapter`): base(x) + adapter(x)."""


def _tp_size(module: nn.Module) -> int:
    group = getattr(module, "tp_group", None)
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def _base_features(module: nn.Module, full_name: str) -> tuple[int, int, torch.Tensor]:
    """(in_features, out_features, weight) of a base the reference can adapt, else an error."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, module.weight
    layers = sys.modules.get(_MEGATRON_LAYERS_MODULE)
    if layers is not None and isinstance(module, (layers.ColumnParallelLinear, layers.RowParallelLinear)):
        tp = _tp_size(module)
        if tp != 1:
            raise ValueError(
                f"{full_name} ({type(module).__name__}) is sharded over a TP group of size {tp}; "
                "the reference LoRA is single-device: use lora.megatron for parallel layers"
            )
        weight = getattr(module, "weight", None)
        if weight is None:
            raise TypeError(
                f"{full_name} ({type(module).__name__}) has no weight of its own "
                "(skip_weight_param_allocation); the reference LoRA cannot adapt it"
            )
        return module.input_size, module.output_size, weight
    raise TypeError(
        f"LoRA selected {full_name or '<root>'} of type {type(module).__module__}.{type(module).__qualname__}, "
        "which has no reference adapter: the reference adapts torch.nn.Linear and megatron-core "
        "ColumnParallelLinear/RowParallelLinear at TP size 1; narrow target_modules or use "
        "lora.megatron for Transformer Engine layers"
    )


@dataclass
class LoRA(LoRABase):
    """Single-device LoRA with the SPEC fields; `LoRA(...)(model)` adapts, freezes and returns the model."""

    def transform(self, module: nn.Module, name: str | None = None, prefix: str | None = None) -> nn.Module:
        full_name = join_name(prefix or "", name or "")
        if is_adapter_wrapper(module) or not self.matcher.matches(module, full_name):
            return module
        in_features, out_features, weight = _base_features(module, full_name)
        dtype = self.lora_dtype
        if dtype is None:
            dtype = weight.dtype if weight.is_floating_point() else torch.float32
        adapter = LoRAAdapter(
            in_features,
            out_features,
            self.adapter_rank(module, full_name),
            alpha=self.alpha,
            dropout=self.dropout,
            dropout_position=self.dropout_position,
            lora_A_init_method=self.lora_A_init_method,
            lora_B_init_method=self.lora_B_init_method,
            dtype=dtype,
            device=weight.device,
        )
        return LoRALinear(module, adapter)


@dataclass
class VLMLoRA(VLMFreezeMixin, LoRA):
    """LoRA for a vision-language model: freezes only the subtrees whose flag is set, then adds adapters.

    A subtree left unfrozen is fully fine-tuned with adapters on top; adapter
    parameters are never frozen.
    """


@dataclass
class LoRAMerge:
    """Folds adapters into base weights on one device.

    `merge(...)` is the weight formula; calling the object on a model (or
    `merge_lora(model)`) replaces every adapter wrapper by its base layer,
    whose weight now holds base + (alpha/dim) * B @ A, so the returned model's
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
        """base_weight + (alpha/dim) * linear_out @ linear_in, in float32, cast once to base_weight's dtype."""
        if tp_size != 1:
            raise ValueError(
                f"LoRAMerge.merge got tp_size={tp_size}; the reference merge is single-device "
                "(tp_size=1): use lora.megatron's LoRAMerge for sharded weights"
            )
        return merge_weight(base_weight, linear_out, linear_in, alpha, dim)

    @torch.no_grad()
    def transform(self, module: nn.Module, name: str | None = None, prefix: str | None = None) -> nn.Module:
        """The base layer with the adapter folded in, for an adapter wrapper; anything else unchanged."""
        if not is_adapter_wrapper(module):
            return module
        base, adapter = module.to_wrap, module.adapter
        merged = self.merge(
            base.weight,
            adapter.linear_out.weight,
            adapter.linear_in.weight,
            adapter.alpha,
            adapter.dim,
            tp_size=_tp_size(base),
            # Subclasses for sharded weights (lora.megatron) need the group.
            tp_group=getattr(base, "tp_group", None),
        )
        base.weight.copy_(merged)
        return base

    def __call__(self, model: nn.Module | list[nn.Module]) -> Any:
        def visit(module: nn.Module, name: str, prefix: str) -> tuple[nn.Module, bool]:
            new = self.transform(module, name, prefix)
            return new, new is module

        if isinstance(model, (list, tuple)):
            return type(model)(walk_and_replace(chunk, visit) for chunk in model)
        return walk_and_replace(model, visit)


def merge_lora(model: nn.Module | list[nn.Module]) -> Any:
    """Fold every adapter of a reference-LoRA model into its base weight; returns plain base layers."""
    return LoRAMerge()(model)
