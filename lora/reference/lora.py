"""The reference's `LoRA` and `VLMLoRA`: `LoRA(...)(model, training)` freezes, wraps every selected module, and returns the model.

`transform` decides what a module becomes: a selected grouped expert linear
a `LoRAGroupedLinear` (one shared adapter or one per expert), any other
selected base a `LoRALinear`, at the rank `dim` (or `dim // moe_router_topk`
for an expert linear under `normalize_moe_lora`) and in `lora_dtype` (or the
base weight's dtype). Fields and validation: `config`; selection: `matching`;
which bases and their shapes: `layers`; freezing: `freeze`; the walk: `walk`.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
from torch import nn

from lora import _spec
from lora.reference.adapters import LoRAAdapter, LoRAExpertAdapters, LoRAGroupedLinear, LoRALinear, _is_wrapper
from lora.reference.config import LoRAFields
from lora.reference.freeze import _freeze_everything, _freeze_vlm_parts
from lora.reference.layers import _base_shape, _grouped_base_shape, _is_grouped_linear
from lora.reference.matching import _is_expert_module, _PatternSelection
from lora.reference.walk import _model_chunks, _replace_modules, _same_container


def _find_topk(candidates: list[Any]) -> Optional[int]:
    """moe_router_topk from the first candidate whose `.config` has it (following `.module` wrappers)."""
    for obj in candidates:
        for _ in range(16):
            if obj is None:
                break
            config = getattr(obj, "config", None)
            topk = getattr(config, "moe_router_topk", None)
            if isinstance(topk, int) and not isinstance(topk, bool) and topk >= 1:
                return topk
            obj = getattr(obj, "module", None) if isinstance(obj, nn.Module) else None
    return None


@dataclass
class LoRA(LoRAFields, _PatternSelection):
    """Single-device LoRA with the SPEC fields; `LoRA(...)(model, training)` adapts, freezes and returns the model."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self._forget_patterns()
        self._roots: list[nn.Module] = []

    # ------------------------------------------------------------- transform
    def _rank_for(self, module: nn.Module, full_name: str) -> int:
        if not self.normalize_moe_lora or not _is_expert_module(full_name):
            return self.dim
        topk = _find_topk([module] + list(self.__dict__.get("_roots", [])))
        if topk is None:
            raise ValueError(
                f"normalize_moe_lora=True but no moe_router_topk was found for expert linear "
                f"{full_name} (looked at the module's and the model's .config)"
            )
        if self.dim % topk != 0:
            raise ValueError(
                f"normalize_moe_lora=True needs dim divisible by moe_router_topk: dim={self.dim} is not "
                f"divisible by topk={topk} for {full_name}"
            )
        return self.dim // topk

    def _adapter_dtype(self, weight: torch.Tensor) -> torch.dtype:
        if self.lora_dtype is not None:
            return self.lora_dtype
        if weight.is_floating_point():
            return weight.dtype
        return torch.float32

    def transform(self, module: nn.Module, name: Optional[str] = None, prefix: Optional[str] = None) -> nn.Module:
        """`module` wrapped in a LoRALinear (LoRAGroupedLinear for a grouped expert linear) when selected; else itself."""
        name = name or ""
        prefix = prefix or ""
        full_name = f"{prefix}.{name}" if prefix else name
        if _is_wrapper(module):
            return module
        if "_used_patterns" not in self.__dict__:
            self._forget_patterns()
        if not self._selected(module, full_name):
            return module
        grouped = _is_grouped_linear(module)
        if grouped:
            in_features, out_features, weights = _grouped_base_shape(module, full_name)
            weight = weights[0]
        else:
            in_features, out_features, weight = _base_shape(module, full_name)
        common = dict(
            alpha=self.alpha,
            dropout=self.dropout,
            dropout_position=self.dropout_position,
            lora_A_init_method=self.lora_A_init_method,
            lora_B_init_method=self.lora_B_init_method,
            dtype=self._adapter_dtype(weight),
            device=weight.device,
        )
        rank = self._rank_for(module, full_name)
        if not grouped:
            return LoRALinear(module, LoRAAdapter(in_features, out_features, rank, **common))
        if self.share_expert_adapters:
            adapter: nn.Module = LoRAAdapter(in_features, out_features, rank, **common)
        else:
            adapter = LoRAExpertAdapters(len(weights), in_features, out_features, rank, **common)
        return LoRAGroupedLinear(module, adapter)

    # ---------------------------------------------------------------- freeze
    def freeze_model(self, model: Any, training: bool = True) -> None:
        """requires_grad=False on every parameter (adapters included); train mode when `training`."""
        _freeze_everything(model, training)

    # ------------------------------------------------------------------ call
    def _already_adapted(self, module: nn.Module, full_name: str) -> bool:
        """True for a wrapper (LoRA applied before): the walk leaves it alone, and its base counts as matched
        so that a second call warns about nothing."""
        if not _is_wrapper(module):
            return False
        self._selected(module.to_wrap, full_name)
        return True

    def __call__(self, model: Any, training: bool = True) -> Any:
        chunks = _model_chunks(model)
        self._forget_patterns()
        self._roots = chunks
        try:
            self.freeze_model(model, training)
            adapted = [_replace_modules(chunk, self.transform, self._already_adapted) for chunk in chunks]
        finally:
            self._roots = []
        result = _same_container(model, adapted)
        if training:
            for chunk in adapted:
                for module in chunk.modules():
                    if _is_wrapper(module):
                        for param in module.adapter.parameters():
                            param.requires_grad = True
                    _grad_into_recomputed_block(module)
        else:
            # Inference, as in Megatron-Bridge: freeze again, adapters included.
            self.freeze_model(result, training=False)
        for chunk in adapted:
            chunk.train(training)
        self._warn_about_unused_patterns()
        return result

    # ----------------------------------------------------------- switching
    def _set_disabled(self, model: Any, disabled: bool) -> None:
        for chunk in _model_chunks(model):
            inner = getattr(chunk, "module", None)
            if "DistributedDataParallel" in type(chunk).__name__ and isinstance(inner, nn.Module):
                chunk = inner
            for module in chunk.modules():
                if _is_wrapper(module):
                    module.disabled = disabled

    def enable_adapter_layers(self, model: Any) -> None:
        """Adapters on: every wrapper adds its adapter to the base output again."""
        self._set_disabled(model, False)

    def disable_adapter_layers(self, model: Any) -> None:
        """Adapters off: every wrapper returns its base module's output alone."""
        self._set_disabled(model, True)

    @contextmanager
    def disable_adapter(self, model: Any) -> Iterator[None]:
        """Off for the block, back on after it, whether or not it raised."""
        self._set_disabled(model, True)
        try:
            yield
        finally:
            self._set_disabled(model, False)



def _grad_into_recomputed_block(module: nn.Module) -> None:
    """Training under megatron's activation recompute (SPEC "Activation recompute").

    megatron's checkpoint is a reentrant autograd Function: its backward runs
    only if an input requires grad. A frozen base feeds a transformer block
    hidden states that do not, so adapters inside a checkpointed region would
    get no gradient. A block (megatron's ``TransformerBlock`` or ``HybridStack``, by
    class name: nothing here imports megatron) whose config asks for recompute gets its forward wrapped once: the hidden
    states enter as a leaf that requires grad, whenever autograd records.
    """
    config = getattr(module, "config", None)
    blocks = {"TransformerBlock", "HybridStack"}
    if getattr(config, "recompute_granularity", None) is None or not blocks & {k.__name__ for k in type(module).__mro__}:
        return
    if getattr(module, "_reference_lora_grad_input", False):
        return
    inner = module.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        key = "hidden_states" if "hidden_states" in kwargs else None
        x = kwargs[key] if key else (args[0] if args else None)
        if torch.is_grad_enabled() and isinstance(x, torch.Tensor) and x.is_floating_point() and not x.requires_grad:
            x = x.detach().requires_grad_(True)
            if key:
                kwargs[key] = x
            else:
                args = (x,) + args[1:]
        return inner(*args, **kwargs)

    module.forward = forward
    module._reference_lora_grad_input = True


@dataclass
class VLMLoRA(LoRA):
    """LoRA for a vision-language model: freezes only the subtrees whose flag is set.

    With training=True the adapters end trainable everywhere and an unflagged
    subtree stays fully trainable (adapters on top). With training=False the
    freeze runs again after the transform, so adapters inside flagged
    subtrees end frozen; unflagged subtrees keep their flags.
    """

    freeze_vision_model: bool = True
    freeze_vision_projection: bool = True
    freeze_language_model: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in _spec.VLM_FIELD_DEFAULTS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: it must be True or False")

    def freeze_model(self, model: Any, training: bool = True) -> None:
        flags = {
            "vision_model": self.freeze_vision_model,
            "vision_projection": self.freeze_vision_projection,
            "language_model": self.freeze_language_model,
        }
        _freeze_vlm_parts(model, flags, training)
