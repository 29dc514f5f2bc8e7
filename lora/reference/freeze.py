"""Which parameters the reference freezes: every parameter (LoRA), or the VLM subtrees whose flag is set (VLMLoRA).

Freezing is `requires_grad = False`; with `training` every chunk is also put
in train mode. Adapters inside a frozen part are frozen too: `LoRA` makes
them trainable again after the walk when it is training.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lora import _spec
from lora.reference.walk import _model_chunks


def _freeze_everything(model: Any, training: bool) -> None:
    """requires_grad=False on every parameter (adapters included); train mode when `training`."""
    for chunk in _model_chunks(model):
        for param in chunk.parameters():
            param.requires_grad = False
        if training:
            chunk.train(True)


def _freeze_vlm_parts(model: Any, flags: dict[str, bool], training: bool) -> None:
    """Freeze each VLM part (vision_model, vision_projection, language_model) whose flag is set; train mode when `training`.

    The model is reached through its first chunk, then `.module` wrappers
    (DDP, Float16Module) and `.llava_model`. A model with none of the parts
    is a ValueError; a part that is None is skipped.
    """
    chunks = _model_chunks(model)
    if not chunks:
        raise ValueError("freeze_model got an empty list of model chunks")
    inner = chunks[0]
    for _ in range(32):  # `.module` wrappers (DDP, Float16Module), then `.llava_model`
        if isinstance(getattr(inner, "module", None), nn.Module):
            inner = inner.module
        elif isinstance(getattr(inner, "llava_model", None), nn.Module):
            inner = inner.llava_model
        else:
            break
    if not any(hasattr(inner, part) for part in _spec.VLM_PARTS):
        raise ValueError(
            f"VLM freeze_model: {type(inner).__name__} has none of the attributes "
            f"{', '.join(_spec.VLM_PARTS)}; use LoRA (not VLMLoRA) for a model without them"
        )
    for part in _spec.VLM_PARTS:
        subtree = getattr(inner, part, None)
        if flags[part] and subtree is not None:
            for param in subtree.parameters():
                param.requires_grad = False
    if training:
        for chunk in chunks:
            chunk.train(True)
