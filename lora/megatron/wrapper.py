"""What every lora.megatron adapted module shares: the wrapper (base layer + adapter, outputs summed) and the adapter branch's dropout.

``AdapterWrapper`` is the base class of every wrapper (dense and expert);
``is_adapter_wrapper`` is how the walk and the merge recognise one.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AdapterWrapper", "is_adapter_wrapper", "add_to_base_output", "apply_dropout"]


def apply_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout with probability p in training; identity in eval or when p == 0."""
    if not training or p == 0.0:
        return x
    return F.dropout(x, p=p, training=True)


def add_to_base_output(base_out: Any, delta: torch.Tensor) -> Any:
    """base output + adapter delta, for a tensor or an `(output, bias, ...)` tuple.

    The delta is cast to the output's dtype first, so the sum happens in the
    base's dtype whatever lora_dtype is. A tuple keeps its shape.
    """
    if isinstance(base_out, tuple):
        if not base_out or not isinstance(base_out[0], torch.Tensor):
            raise TypeError(
                f"base layer returned a tuple whose first item is not a tensor: {type(base_out[0]).__name__ if base_out else 'empty'}"
            )
        out = base_out[0]
        return (out + delta.to(out.dtype), *base_out[1:])
    if not isinstance(base_out, torch.Tensor):
        raise TypeError(
            f"base layer returned {type(base_out).__name__}; expected a tensor or an (output, bias) tuple"
        )
    return base_out + delta.to(base_out.dtype)


class AdapterWrapper(nn.Module):
    """Marker base of every adapted module: the base layer `to_wrap` plus its `adapter`.

    The default forward adds `adapter(x)` to the base output (tensor or
    `(output, bias)` tuple); with the adapter switched off (``adapter_on``
    False) every wrapper's forward is the base layer's alone. Attributes the wrapper lacks are looked up on the
    base layer, so code that reads e.g. `layer.linear_qkv.weight` still works.
    """

    def __init__(self, to_wrap: nn.Module, adapter: nn.Module):
        super().__init__()
        self.to_wrap = to_wrap
        self.adapter = adapter
        #: False while the adapters are switched off: forward is the base layer's alone.
        self.adapter_on = True

    def enable_adapter_layers(self) -> None:
        self.adapter_on = True

    def disable_adapter_layers(self) -> None:
        self.adapter_on = False

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if not self.adapter_on:
            return self.to_wrap(x, *args, **kwargs)
        return add_to_base_output(self.to_wrap(x, *args, **kwargs), self.adapter(x))

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Any = None) -> dict[str, Any]:
        """megatron-core's distributed-checkpoint view: the base layer's tensors under the keys it has
        unwrapped (``prefix``; so a parent that rewrites its child's keys, as a gated MLP does for
        ``linear_fc1.weight``, still finds them, and a base checkpoint loads into an adapted model), the
        adapter's under ``prefix + "adapter."``: an adapter tensor's key is its parameter name.

        Defined here because attribute lookup falls through to the base layer: without it, megatron would
        call the base's ``sharded_state_dict`` and the adapter would never reach a checkpoint."""
        from megatron.core.transformer.utils import sharded_state_dict_default

        out = dict(sharded_state_dict_default(self.to_wrap, prefix, sharded_offsets, metadata))
        out.update(sharded_state_dict_default(self.adapter, f"{prefix}adapter.", sharded_offsets, metadata))
        return out

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            to_wrap = self.__dict__.get("_modules", {}).get("to_wrap")
            if to_wrap is None:
                raise
        try:
            return getattr(to_wrap, name)
        except AttributeError:
            raise AttributeError(
                f"'{type(self).__name__}' object (wrapping {type(to_wrap).__name__}) has no attribute '{name}'"
            ) from None


def is_adapter_wrapper(module: object) -> bool:
    """True for a module that already carries a lora.megatron adapter (an ``AdapterWrapper``)."""
    return isinstance(module, AdapterWrapper)
