"""LoRA and VLMLoRA for megatron-core models: the model-level dispatch list, which adapter a matched module gets.

Same public API and parameter names as ``lora.reference`` (and as
Megatron-Bridge's PEFT LoRA): ``<module>.to_wrap.weight``,
``<module>.adapter.linear_in.weight``, ``<module>.adapter.linear_out.weight``.
``LoRA.transform`` picks, for a module the matcher selects:

* a grouped expert linear: ``expert_adapters.wrap_grouped_expert``;
* a SequentialMLP expert's column/row parallel linear:
  ``expert_adapters.wrap_sequential_expert`` (expert-TP group);
* a dense column/row parallel linear: ``dense_adapters.wrap_parallel`` (TP group);
* a plain ``torch.nn.Linear``: ``dense_adapters.wrap_linear``;
* anything else: a ``TypeError``.

The fields and their validation (``config``), the matching (``matching``),
the walk (``walk.LoRABase``), the freezing (``freeze``) and the draws
(``init``) live in their own modules; merging is ``lora.megatron.merge``.
Nothing here imports ``lora.reference``: the reference is the harness's
independent oracle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from torch import nn

from lora.megatron.dense_adapters import wrap_linear, wrap_parallel
from lora.megatron.expert_adapters import (
    is_grouped_linear,
    is_sequential_expert_linear,
    wrap_grouped_expert,
    wrap_sequential_expert,
)
from lora.megatron.freeze import VLMFreezeMixin
from lora.megatron.init import SequentialExpertInit, sync_global_rng_from_rank0
from lora.megatron.layout import base_parallel_kind
from lora.megatron.walk import LoRABase, join_name
from lora.megatron.wrapper import is_adapter_wrapper

__all__ = ["LoRA", "VLMLoRA"]


@dataclass
class LoRA(LoRABase):
    """LoRA for megatron-core column/row parallel linears (and plain nn.Linear)."""

    def __call__(self, model: Any, training: bool = True) -> Any:
        sync_global_rng_from_rank0()
        self._expert_init = SequentialExpertInit()
        self._sp_blocks = 0  # SP TransformerBlocks the walk is inside (enter_subtree / leave_subtree)
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
        if _forks_model_parallel_rng(module):
            self.__dict__["_sp_blocks"] = self.__dict__.get("_sp_blocks", 0) + 1

    def leave_subtree(self, module: nn.Module, full_name: str) -> None:
        self.expert_init.leave(module, full_name)
        if _forks_model_parallel_rng(module):
            self.__dict__["_sp_blocks"] = self.__dict__.get("_sp_blocks", 0) - 1

    def transform(self, module: nn.Module, name: Optional[str] = None, prefix: Optional[str] = None) -> nn.Module:
        full_name = join_name(prefix or "", name or "")
        if is_adapter_wrapper(module) or not self.matcher.matches(module, full_name):
            return module
        # Routed experts (explicit expert comm over the expert-TP group):
        # lora.megatron.expert_adapters. Shared experts are ordinary dense linears.
        if is_grouped_linear(module):
            return wrap_grouped_expert(self, module, full_name)
        kind = base_parallel_kind(module)
        if kind is not None and is_sequential_expert_linear(module):
            return wrap_sequential_expert(self, module, full_name, kind, self.expert_init)
        if kind is None:
            if isinstance(module, nn.Linear):
                return wrap_linear(self, module, full_name)
            raise TypeError(
                f"lora.megatron: {full_name} matched a target pattern but its type "
                f"{type(module).__module__}.{type(module).__qualname__} has no LoRA adapter here "
                "(supported: megatron-core ColumnParallelLinear, RowParallelLinear, grouped expert "
                "linears (num_gemms, weight0..), torch.nn.Linear)"
            )
        return wrap_parallel(self, module, full_name, kind, in_sp_block=self.__dict__.get("_sp_blocks", 0) > 0)


def _forks_model_parallel_rng(module: nn.Module) -> bool:
    """A megatron TransformerBlock under sequence parallelism: its forward runs every layer inside
    the model-parallel RNG stream (``get_cuda_rng_tracker().fork()`` around the whole block)."""
    from megatron.core.transformer.transformer_block import TransformerBlock

    return isinstance(module, TransformerBlock) and bool(getattr(module.config, "sequence_parallel", False))


@dataclass
class VLMLoRA(VLMFreezeMixin, LoRA):
    """LoRA for a vision-language model: freezes only the subtrees whose flag is set, then adds adapters."""
