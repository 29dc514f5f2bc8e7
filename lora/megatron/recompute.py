"""Adapter gradients under megatron-core's activation recompute (harness/SPEC.md, "Activation recompute").

megatron-core recomputes through ``tensor_parallel.checkpoint``, a reentrant
``torch.autograd.Function``: autograd calls its backward only when one of its
tensor inputs requires grad. With the base frozen and no pipeline stage
before (pipeline size 1), the hidden states entering a transformer block do
not require grad, so a checkpointed layer (``full`` recompute), or a
checkpointed MLP or MoE layer (``selective`` with ``mlp``/``moe``) ahead of
every trainable adapter, never runs its backward: its adapters get no
gradient, or the loss has no grad_fn at all.

The fix here: when a LoRA is applied for training to a model whose config
asks for recompute (``recompute_granularity`` set), every ``TransformerBlock``
gets a forward pre-hook that hands its ``hidden_states`` on as a leaf that
requires grad (same values, detached from nothing trainable). No parameter's
``requires_grad`` changes. The hook is installed once per block (applying the
LoRA twice installs nothing more) and only acts while autograd records.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["enable_recompute_input_grad", "recompute_configured"]

_HOOKED = "_lora_megatron_recompute_input_grad"


def recompute_configured(module: nn.Module) -> bool:
    """Whether the module's megatron config asks for activation recompute (full or selective)."""
    config = getattr(module, "config", None)
    return getattr(config, "recompute_granularity", None) is not None


def _requires_grad(hidden_states: Any) -> Any:
    if (isinstance(hidden_states, torch.Tensor) and hidden_states.is_floating_point()
            and not hidden_states.requires_grad and torch.is_grad_enabled()):
        return hidden_states.detach().requires_grad_(True)
    return hidden_states


def _pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    if "hidden_states" in kwargs:
        kwargs = dict(kwargs, hidden_states=_requires_grad(kwargs["hidden_states"]))
    elif args:
        args = (_requires_grad(args[0]),) + tuple(args[1:])
    return args, kwargs


def enable_recompute_input_grad(chunks: list[nn.Module]) -> int:
    """Hook every TransformerBlock of ``chunks`` configured for recompute; returns how many were hooked now."""
    from megatron.core.transformer.transformer_block import TransformerBlock

    hooked = 0
    for chunk in chunks:
        for module in chunk.modules():
            if isinstance(module, TransformerBlock) and recompute_configured(module) and not getattr(module, _HOOKED, False):
                module.register_forward_pre_hook(_pre_hook, with_kwargs=True)
                setattr(module, _HOOKED, True)
                hooked += 1
    return hooked
