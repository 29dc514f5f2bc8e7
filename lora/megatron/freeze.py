"""Which parameters lora.megatron freezes: all of them (LoRA), or the VLM subtrees whose flag is set (VLMLoRA).

Also which parameters are adapter parameters (made trainable after the
walk), and ``model_chunks``: a model or a list of model chunks as a list.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from torch import nn

from lora._spec import VLM_PARTS
from lora.megatron.wrapper import is_adapter_wrapper

__all__ = [
    "model_chunks",
    "adapter_parameters",
    "freeze_parameters",
    "freeze_vlm",
    "VLMFreezeMixin",
]

_VLM_PARTS = VLM_PARTS


def model_chunks(model: nn.Module | list[nn.Module] | tuple[nn.Module, ...]) -> list[nn.Module]:
    """`model` as a list of chunks: the list or tuple itself, or [model]."""
    return list(model) if isinstance(model, (list, tuple)) else [model]


def adapter_parameters(model: nn.Module | list[nn.Module]) -> list[nn.Parameter]:
    """Every parameter that belongs to an adapter (not to a base layer), without duplicates."""
    seen: dict[int, nn.Parameter] = {}
    for chunk in model_chunks(model):
        for module in chunk.modules():
            if is_adapter_wrapper(module):
                for p in module.adapter.parameters():
                    seen.setdefault(id(p), p)
    return list(seen.values())


def freeze_parameters(modules: Iterable[nn.Module]) -> None:
    """requires_grad=False on every parameter of `modules` (adapters included)."""
    for module in modules:
        for p in module.parameters():
            p.requires_grad_(False)


def _unwrap_vlm(model: nn.Module | list[nn.Module]) -> nn.Module:
    if isinstance(model, (list, tuple)):
        if not model:
            raise ValueError("freeze_model got an empty list of model chunks")
        model = model[0]
    for _ in range(32):  # DDP / Float16Module `.module` chains, then `.llava_model`
        inner = getattr(model, "module", None)
        if isinstance(inner, nn.Module):
            model = inner
            continue
        inner = getattr(model, "llava_model", None)
        if isinstance(inner, nn.Module):
            model = inner
            continue
        break
    return model


def freeze_vlm(
    model: nn.Module | list[nn.Module],
    *,
    freeze_vision_model: bool = True,
    freeze_vision_projection: bool = True,
    freeze_language_model: bool = True,
    training: bool = True,
) -> None:
    """Freeze the chosen subtrees (vision_model, vision_projection, language_model) of a VLM.

    The model is unwrapped first (first chunk of a list, `.module` chains,
    `.llava_model`). A subtree is frozen when its flag is set and it is not
    None (adapters inside it included); all other parameters are left alone.
    Train mode when `training` (on every chunk).
    """
    inner = _unwrap_vlm(model)
    if not any(hasattr(inner, part) for part in _VLM_PARTS):
        raise ValueError(
            f"VLM freeze_model: {type(inner).__name__} has none of the attributes "
            f"{', '.join(_VLM_PARTS)}; use LoRA (not VLMLoRA) for a model without them"
        )
    flags = dict(
        vision_model=freeze_vision_model,
        vision_projection=freeze_vision_projection,
        language_model=freeze_language_model,
    )
    subtrees = [getattr(inner, part, None) for part in _VLM_PARTS if flags[part]]
    freeze_parameters([s for s in subtrees if s is not None])
    if training:
        for chunk in model_chunks(model):
            chunk.train(True)


@dataclass
class VLMFreezeMixin:
    """The three VLM freeze flags and the freeze_model that honours them.

    Put it before the LoRA class in the bases: `class VLMLoRA(VLMFreezeMixin, LoRA)`.
    """

    freeze_vision_model: bool = True
    freeze_vision_projection: bool = True
    freeze_language_model: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()  # type: ignore[misc]
        for name in ("freeze_vision_model", "freeze_vision_projection", "freeze_language_model"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: it must be True or False")

    def freeze_model(self, model: nn.Module | list[nn.Module], training: bool = True) -> None:
        freeze_vlm(
            model,
            freeze_vision_model=self.freeze_vision_model,
            freeze_vision_projection=self.freeze_vision_projection,
            freeze_language_model=self.freeze_language_model,
            training=training,
        )
