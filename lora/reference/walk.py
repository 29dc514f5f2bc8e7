"""How the reference replaces modules in a model: a pre-order walk over `named_modules()` that swaps what a transform returns.

Applying a LoRA (`lora.reference.lora`) and merging it (`lora.reference.merge`)
both walk this way: a replaced module's insides are not walked, and every
child slot that held it then points at its replacement. A model is a module
or a list (tuple) of model chunks; the result has the same shape.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from torch import nn


def _model_chunks(model: Any) -> list[nn.Module]:
    if isinstance(model, (list, tuple)):
        return list(model)
    return [model]


def _same_container(model: Any, chunks: list[nn.Module]) -> Any:
    if isinstance(model, (list, tuple)):
        return type(model)(chunks)
    return chunks[0]


def _is_inside(full_name: str, outer_names: list[str]) -> bool:
    """True when `full_name` names a strict descendant of one of `outer_names` ('' is the root)."""
    for outer in outer_names:
        if outer == "" and full_name != "":
            return True
        if outer != "" and full_name.startswith(outer + "."):
            return True
    return False


def _replace_children(parents: list[nn.Module], replacements: dict[int, nn.Module]) -> None:
    """Point every child slot that holds a replaced module at its replacement."""
    for parent in parents:
        if id(parent) in replacements:
            continue
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in replacements:
                parent._modules[child_name] = replacements[id(child)]


def _replace_modules(
    chunk: nn.Module,
    transform: Callable[[nn.Module, str, str], nn.Module],
    leave_alone: Optional[Callable[[nn.Module, str], bool]] = None,
) -> nn.Module:
    """Pre-order walk over `chunk.named_modules()`, putting `transform(module, name, prefix)` in place of each module it changes.

    A module for which `leave_alone(module, full_name)` is true is neither
    transformed nor walked into. Returns the chunk, or its replacement.
    """
    visited = list(chunk.named_modules())
    replacements: dict[int, nn.Module] = {}
    skip_under: list[str] = []  # replaced or left-alone modules: their insides are not walked
    for full_name, module in visited:
        if _is_inside(full_name, skip_under):
            continue
        if leave_alone is not None and leave_alone(module, full_name):
            skip_under.append(full_name)
            continue
        prefix, _, name = full_name.rpartition(".")
        new = transform(module, name, prefix)
        if new is not module:
            replacements[id(module)] = new
            skip_under.append(full_name)
    _replace_children([m for _, m in visited], replacements)
    return replacements.get(id(chunk), chunk)
