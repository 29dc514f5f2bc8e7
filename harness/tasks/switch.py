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


def switch_evidence(peft: Any, model: Any, forward: Callable[[Any], torch.Tensor], base: torch.Tensor,
                    named: Callable[[Any], Any] = lambda m: m) -> SwitchExtras:
    """Every step of ``STEPS`` on ``model`` (already adapted by ``peft``, in eval mode), as float64 CPU logits.

    ``model`` is what the implementation was handed (a pipeline stage's list of chunks, say) and
    ``named(model)`` a module whose parameters and submodules name it (``harness.pipeline.global_view``).
    Every rank agrees that a step went through before the next forward pass: a rank whose implementation
    raised must not leave the others waiting in a collective of the model's forward."""
    from harness.tasks.common import any_rank

    def run() -> torch.Tensor:
        with torch.no_grad():
            return forward(model).detach().to(device="cpu", dtype=torch.float64)

    adapted = run()
    missing = tuple(m for m in SWITCH_METHODS if not callable(getattr(peft, m, None)))
    if missing:
        return SwitchExtras(base=base, adapted=adapted, missing=missing)
    before = _snapshot(named(model))
    tree = [(n, type(m).__name__) for n, m in named(model).named_modules()]
    steps: dict[str, torch.Tensor] = {}

    def raising_block() -> None:
        try:
            with peft.disable_adapter(model):
                raise _Probe("raised by the harness inside disable_adapter")
        except _Probe:
            pass

    block: list[Any] = []

    def enter() -> None:
        block.append(peft.disable_adapter(model))
        block[0].__enter__()

    # The block is entered by every rank before its forward pass, and left after it.
    actions = {
        "inside disable_adapter": enter,
        "after disable_adapter": lambda: block[0].__exit__(None, None, None),
        "disable_adapter_layers": lambda: (peft.disable_adapter_layers(model), peft.disable_adapter_layers(model)),
        "enable_adapter_layers": lambda: (peft.enable_adapter_layers(model), peft.enable_adapter_layers(model)),
        "after a raising block": raising_block,
    }
    for step, action in actions.items():
        error = None
        try:
            action()
        except Exception as exc:  # noqa: BLE001 - reported as the implementation's, with the step
            error = f"{step}: {type(exc).__name__}: {exc}"
        if any_rank(error is not None):
            return SwitchExtras(base=base, adapted=adapted, steps=steps,
                                error=error or f"{step}: another rank raised there (its record says what)")
        steps[step] = run()
    after = _snapshot(named(model))
    changed = tuple(sorted(
        n for n in set(before) | set(after)
        if n not in before or n not in after or before[n][1] != after[n][1] or not torch.equal(before[n][0], after[n][0])
    ))
    tree_changed = tree != [(n, type(m).__name__) for n, m in named(model).named_modules()]
    return SwitchExtras(base=base, adapted=adapted, steps=steps, changed=changed, tree_changed=tree_changed)
