"""Switching adapters off and on (harness/SPEC.md, "Switching adapters off"): the evidence on one rank.

A family's switch task builds its model at the case's layout, loads the
seeded base weights, runs the base model once (``base``: before any LoRA),
applies the implementation's LoRA, loads seeded adapter weights with B
non-zero (so every adapter changes the logits) and hands the model here.
``switch_evidence`` then runs, in eval mode on the same input, the logits at
each step of ``STEPS``; the property (``harness.properties.adapter_switch``)
compares them with ``base`` and ``adapted`` in the parent. Nothing here reads
the implementation's adapters: the oracle is the model before the LoRA.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from harness.evidence import SwitchExtras

__all__ = ["STEPS", "SWITCH_METHODS", "switch_evidence"]

#: The LoRA object's methods the contract names.
SWITCH_METHODS = ("enable_adapter_layers", "disable_adapter_layers", "disable_adapter")

#: step -> (what it is, whether the adapters should be on there).
STEPS = {
    "inside disable_adapter": ("the logits inside `with lora.disable_adapter(model)`", False),
    "after disable_adapter": ("the logits after that block", True),
    "disable_adapter_layers": ("the logits after `disable_adapter_layers(model)`, called twice", False),
    "enable_adapter_layers": ("the logits after `enable_adapter_layers(model)`, called twice", True),
    "after a raising block": ("the logits after a `disable_adapter(model)` block whose body raised", True),
}


class _Probe(Exception):
    """Raised inside ``disable_adapter`` by the harness itself."""


def _snapshot(model: Any) -> dict[str, tuple[torch.Tensor, bool]]:
    return {n: (p.detach().clone(), bool(p.requires_grad)) for n, p in model.named_parameters()}


def switch_evidence(peft: Any, model: Any, forward: Callable[[Any], torch.Tensor], base: torch.Tensor) -> SwitchExtras:
    """Every step of ``STEPS`` on ``model`` (already adapted by ``peft``, in eval mode), as float64 CPU logits."""
    def run() -> torch.Tensor:
        with torch.no_grad():
            return forward(model).detach().to(device="cpu", dtype=torch.float64)

    adapted = run()
    missing = tuple(m for m in SWITCH_METHODS if not callable(getattr(peft, m, None)))
    if missing:
        return SwitchExtras(base=base, adapted=adapted, missing=missing)
    before = _snapshot(model)
    tree = [(n, type(m).__name__) for n, m in model.named_modules()]
    steps: dict[str, torch.Tensor] = {}
    step = "inside disable_adapter"
    try:
        with peft.disable_adapter(model):
            steps[step] = run()
        step = "after disable_adapter"
        steps[step] = run()
        step = "disable_adapter_layers"
        peft.disable_adapter_layers(model)
        peft.disable_adapter_layers(model)
        steps[step] = run()
        step = "enable_adapter_layers"
        peft.enable_adapter_layers(model)
        peft.enable_adapter_layers(model)
        steps[step] = run()
        step = "after a raising block"
        try:
            with peft.disable_adapter(model):
                raise _Probe("raised by the harness inside disable_adapter")
        except _Probe:
            pass
        steps[step] = run()
    except Exception as exc:  # noqa: BLE001 - reported as the implementation's, with the step
        return SwitchExtras(base=base, adapted=adapted, steps=steps, error=f"{step}: {type(exc).__name__}: {exc}")
    after = _snapshot(model)
    changed = tuple(sorted(
        n for n in set(before) | set(after)
        if n not in before or n not in after or before[n][1] != after[n][1] or not torch.equal(before[n][0], after[n][0])
    ))
    tree_changed = tree != [(n, type(m).__name__) for n, m in model.named_modules()]
    return SwitchExtras(base=base, adapted=adapted, steps=steps, changed=changed, tree_changed=tree_changed)
