"""LoRA, VLMLoRA and LoRAMerge for megatron-core models under tensor parallelism.

Same public API and parameter names as ``lora.reference`` (and as
Megatron-Bridge's PEFT LoRA): ``<module>.to_wrap.weight``,
``<module>.adapter.linear_in.weight``, ``<module>.adapter.linear_out.weight``.
Matching, init methods, config validation, the module walk and the freezing
rules live in ``lora.megatron._base``; this module decides how a matched
linear is adapted across its TP group, and how adapters are merged back.
Routed-expert linears (SequentialMLP experts, grouped expert linears) go to
``lora.megatron.experts`` (expert-TP group, explicit expert communication).
Nothing here imports ``lora.reference``: the reference is the harness's
independent oracle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from lora.megatron._base import (
    LoRABase,
    VLMFreezeMixin,
    is_adapter_wrapper,
    join_name,
    merge_weight,
    walk_and_replace,
)
from lora.megatron.experts import (
    SequentialExpertInit,
    is_expert_wrapper,
    is_grouped_linear,
    is_sequential_expert_linear,
    merge_expert_wrapper,
    wrap_grouped_expert,
    wrap_sequential_expert,
)
from lora.megatron.adapters import (
    LinearAdapter,
    LoRALinear,
    ParallelLinearAdapter,
    ParallelLoRALinear,
    base_parallel_kind,
    group_size,
    is_gated_fc1,
)

__all__ = ["LoRA", "VLMLoRA", "LoRAMerge", "merge_lora"]


def _sync_global_rng_from_rank0() -> None:
    """Give every rank global rank 0's torch CPU generator state.

    Every rank draws each adapter's full A and B from torch's global
    generator, in walk order, and keeps its own slice; the slices only fit
    together if all ranks draw the same numbers. Rank 0's stream is left as
    it was, so rank 0 draws exactly what a single-device run draws for the
    same seed (and what ``lora.reference`` draws, by the SPEC).
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    state = torch.get_rng_state()
    # NCCL only moves CUDA tensors.
    carrier = state.cuda() if dist.get_backend() == "nccl" else state.clone()
    dist.broadcast(carrier, src=0)
    torch.set_rng_state(carrier.cpu())


@dataclass
class LoRA(LoRABase):
    """LoRA for megatron-core column/row parallel linears (and plain nn.Linear)."""

    def __call__(self, model: Any, training: bool = True) -> Any:
        _sync_global_rng_from_rank0()
        self._expert_init = SequentialExpertInit()
        try:
            return super().__call__(model, training=training)
        finally:
            self._expert_init.reset()

    @property
    def expert_init(self) -> SequentialExpertInit:
        """The SequentialMLP init replay of the current walk (a fresh one outside a walk)."""
        if self.__dict__.get("_expert_init") is None:
            self._expert_init = SequentialExpertInit()
        return self._expert_init

    def enter_subtree(self, module: nn.Module, full_name: str) -> None:
        self.expert_init.enter(module, full_name)

    def leave_subtree(self, module: nn.Module, full_name: str) -> None:
        self.expert_init.leave(module, full_name)

    def transform(self, module: nn.Module, name: Optional[str] = None, prefix: Optional[str] = None) -> nn.Module:
        full_name = join_name(prefix or "", name or "")
        if is_adapter_wrapper(module) or not self.matcher.matches(module, full_name):
            return module
        # Routed experts (explicit expert comm over the expert-TP group):
        # lora.megatron.experts. Shared experts are ordinary dense linears.
        if is_grouped_linear(module):
            return wrap_grouped_expert(self, module, full_name)
        kind = base_parallel_kind(module)
        if kind is not None and is_sequential_expert_linear(module):
            return wrap_sequential_expert(self, module, full_name, kind, self.expert_init)
        if kind is None:
            if isinstance(module, nn.Linear):
                return self._wrap_linear(module, full_name)
            raise TypeError(
                f"lora.megatron: {full_name} matched a target pattern but its type "
                f"{type(module).__module__}.{type(module).__qualname__} has no LoRA adapter here "
                "(supported: megatron-core ColumnParallelLinear, RowParallelLinear, grouped expert "
                "linears (num_gemms, weight0..), torch.nn.Linear)"
            )
        return self._wrap_parallel(module, full_name, kind)

    def _wrap_linear(self, module: nn.Linear, full_name: str) -> nn.Module:
        """An unsharded nn.Linear: a plain single-device adapter."""
        weight = module.weight
        lora_dtype = self.lora_dtype or (weight.dtype if weight.is_floating_point() else torch.float32)
        adapter = LinearAdapter(
            module.in_features,
            module.out_features,
            self.adapter_rank(module, full_name),
            alpha=self.alpha,
            dropout=self.dropout,
            dropout_position=self.dropout_position,
            lora_dtype=lora_dtype,
            device=weight.device,
        )
        adapter.reset_parameters(self.lora_A_init_method, self.lora_B_init_method)
        return LoRALinear(module, adapter)

    def _wrap_parallel(self, module: nn.Module, full_name: str, kind: str) -> nn.Module:
        config = module.config
        tp_group = module.tp_group
        t = group_size(tp_group)
        dim = self.adapter_rank(module, full_name)
        sequence_parallel = t > 1 and bool(getattr(module, "sequence_parallel", False))
        if kind == "column" and dim % t:
            raise ValueError(
                f"lora.megatron: dim={dim} is not divisible by TP={t} for {full_name} "
                "(a column-parallel base splits A along the rank dimension)"
            )
        if kind == "row" and module.output_size % t:
            raise ValueError(
                f"lora.megatron: output size {module.output_size} is not divisible by TP={t} for {full_name} "
                "(a row-parallel base splits B along its output rows)"
            )
        lora_dtype = self.lora_dtype or module.weight.dtype
        adapter = ParallelLinearAdapter(
            kind=kind,
            in_features=module.input_size,
            out_features=module.output_size,
            dim=dim,
            alpha=self.alpha,
            dropout=self.dropout,
            dropout_position=self.dropout_position,
            lora_dtype=lora_dtype,
            base_config=config,
            tp_group=tp_group,
            is_expert=bool(getattr(module, "is_expert", False)),
            gated=is_gated_fc1(module, full_name),
            module_name=full_name,
            input_is_parallel=bool(getattr(module, "input_is_parallel", True)),
            sequence_parallel=sequence_parallel,
            # a2a replaces a row adapter's gather + sequence split; a column
            # adapter has no such step, so the flag does not concern it.
            a2a=bool(self.a2a_experimental) and kind == "row",
        )
        adapter.reset_parameters(self.lora_A_init_method, self.lora_B_init_method)
        return ParallelLoRALinear(module, adapter)


@dataclass
class VLMLoRA(VLMFreezeMixin, LoRA):
    """LoRA for a vision-language model: freezes only the subtrees whose flag is set, then adds adapters."""


class LoRAMerge:
    """Fold a (possibly TP-sharded) adapter into its base weight.

    Expert adapters fold on the expert-TP group (``lora.megatron.experts``);
    a grouped linear's ``weight{i}`` gets expert i's (or the shared) B @ A.
    Calling it on a model (or ``merge_lora(model)``) replaces every adapter
    wrapper by its base layer holding the merged weight shard; base weights
    are updated in place, so the returned model shares its layers with the
    input.
    """

    @torch.no_grad()
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
        if tp_size == 1:
            return merge_weight(base_weight, linear_out, linear_in, alpha, dim)
        if tp_group is None or group_size(tp_group) != tp_size:
            raise ValueError(
                f"LoRAMerge.merge: tp_size={tp_size} needs the TP process group of that size "
                f"(got {'None' if tp_group is None else f'a group of size {group_size(tp_group)}'})"
            )
        out_local, in_local = base_weight.shape
        if linear_in.shape[1] == in_local and linear_out.shape[0] == out_local:
            # Column-parallel base: A is split along r; gather it.
            linear_in = _all_gather_dim0(linear_in, tp_group)
        elif linear_out.shape[0] * tp_size == out_local:
            # Row-parallel base: B is split along out; gather it.
            linear_out = _all_gather_dim0(linear_out, tp_group)
        else:
            raise ValueError(
                f"LoRAMerge.merge: shapes base {tuple(base_weight.shape)}, linear_out {tuple(linear_out.shape)}, "
                f"linear_in {tuple(linear_in.shape)} fit neither a column-parallel nor a row-parallel shard at TP={tp_size}"
            )
        return merge_weight(base_weight, linear_out, linear_in, alpha, dim)


    @torch.no_grad()
    def transform(self, module: nn.Module, name: Optional[str] = None, prefix: Optional[str] = None) -> nn.Module:
        """The base layer with the adapter folded in, for an adapter wrapper; anything else unchanged."""
        if not is_adapter_wrapper(module):
            return module
        if is_expert_wrapper(module):
            return merge_expert_wrapper(self, module)
        base, adapter = module.to_wrap, module.adapter
        tp_group = getattr(base, "tp_group", None) if isinstance(module, ParallelLoRALinear) else None
        merged = self.merge(
            base.weight,
            adapter.linear_out.weight,
            adapter.linear_in.weight,
            adapter.alpha,
            adapter.dim,
            tp_size=group_size(tp_group),
            tp_group=tp_group,
        )
        base.weight.copy_(merged)
        return base

    def __call__(self, model: Any) -> Any:
        def visit(module: nn.Module, name: str, prefix: str) -> tuple[nn.Module, bool]:
            new = self.transform(module, name, prefix)
            return new, new is module

        if isinstance(model, (list, tuple)):
            return type(model)(walk_and_replace(chunk, visit) for chunk in model)
        return walk_and_replace(model, visit)


def _all_gather_dim0(t: torch.Tensor, group: Any) -> torch.Tensor:
    t = t.contiguous()
    out = torch.empty((t.shape[0] * group_size(group),) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    torch.distributed.all_gather_into_tensor(out, t, group=group)
    return out


def merge_lora(model: Any) -> Any:
    """Fold every adapter into its base weight; wrappers become plain base layers."""
    return LoRAMerge()(model)
