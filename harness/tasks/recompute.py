"""Activation recompute (harness/SPEC.md, "Activation recompute"): the evidence on one rank.

A family's recompute task hands ``recompute_evidence`` a function that, for
megatron config overrides, builds the case's model at its layout, loads the
seeded base weights, applies the implementation's LoRA for training, loads
seeded adapter weights (B non-zero, so every adapter has a gradient), runs
forward on an input that does not require grad (as the embedding's output
does under a frozen base at pipeline size 1) and backward with a seeded
probe, each run from the same RNG states, with the case's dropout (megatron's
checkpoint restores the RNG states before it recomputes, so a correct
implementation draws the same masks again). A setting megatron-core itself
cannot run for the example's model (selective MLP recompute of a biased MLP)
is left out and named: ``settings_not_run``.
It runs once without recompute and once per entry of the family's
``SETTINGS``; the property (``harness.properties.recompute``) compares each
with the run without. The oracle is the implementation itself without
recompute: nothing here reads the reference, and the comparison passes only
if recompute changes nothing.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from harness.evidence import RecomputeExtras, RecomputeRun
from harness.tasks.common import any_rank, cpu64

__all__ = ["SETTINGS", "BrokenTable", "recompute_evidence", "adapter_gradients", "probe_backward", "settings_not_run",
           "require_grad_fn"]

_FULL = dict(recompute_granularity="full")

#: family -> setting name -> megatron TransformerConfig overrides (the models have two layers).
#: (``layernorm`` recompute is left out: megatron-core 0.19 reaches Transformer Engine's
#: FP8GlobalStateManager on that path, which does not exist without Transformer Engine. ``full`` recompute
#: with ``recompute_method="block"`` (the first layer only) was a third setting until session 10; it left
#: to keep the suite within its 10 minutes, and the training loop's designed ``full-block`` recompute
#: (``harness.training.RECOMPUTE``) still runs it at every layout, against the reference.)
SETTINGS: dict[str, dict[str, dict[str, Any]]] = {
    "gpt": {
        "full, uniform, every layer": dict(_FULL, recompute_method="uniform", recompute_num_layers=1),
        "selective: mlp, core_attn": dict(recompute_granularity="selective", recompute_modules=["mlp", "core_attn"]),
    },
    "moe": {
        "full, uniform, every layer": dict(_FULL, recompute_method="uniform", recompute_num_layers=1),
        "selective: moe, core_attn": dict(recompute_granularity="selective", recompute_modules=["moe", "core_attn"]),
    },
}


class BrokenTable(Exception):
    """The adapters' names or shapes are off harness/SPEC.md (on some rank): ``record`` is what every rank sends."""

    def __init__(self, record: Any) -> None:
        super().__init__("adapter table")
        self.record = record


def adapter_gradients(model: torch.nn.Module) -> dict[str, Optional[torch.Tensor]]:
    """Every trainable parameter's gradient (float64 CPU copies; None where autograd left none)."""
    return {n: cpu64(p.grad) for n, p in model.named_parameters() if p.requires_grad}


#: Why a setting is not run for a biased model: megatron-core 0.19's selective MLP recompute of an MLP
#: with biases does not return, with or without LoRA (its checkpoint's backward re-enters itself:
#: ``CheckpointFunction.backward`` nested in the backward of its own recomputed graph, found by the first
#: deep run and reproduced on the bare base model), so no implementation can be judged there.
BIASED_SELECTIVE_MLP = ("megatron-core's selective recompute of a biased MLP does not return, without any LoRA "
                        "(its checkpoint backward re-enters itself): not run")


def settings_not_run(family: str, case: Any) -> dict[str, str]:
    """The family's settings this example leaves out, with the reason (what megatron-core itself cannot run)."""
    if not getattr(getattr(case, "shape", None), "add_bias_linear", False):
        return {}
    return {name: BIASED_SELECTIVE_MLP for name, overrides in SETTINGS[family].items()
            if overrides.get("recompute_granularity") == "selective" and "mlp" in overrides.get("recompute_modules", ())}


def require_grad_fn(out: torch.Tensor) -> None:
    """Raise on every rank when the training logits have no grad_fn on any rank (nothing they depend on
    requires grad): a rank that skipped backward would leave the others waiting in its collectives."""
    lost = not out.requires_grad
    if any_rank(lost):
        where = "on this rank" if lost else "on another rank"
        raise RuntimeError(f"the training logits have no grad_fn {where}: nothing they depend on requires grad")


def probe_backward(out: torch.Tensor, probe: torch.Tensor) -> None:
    """``(out * probe).sum().backward()``, agreed by every rank first (``require_grad_fn``)."""
    require_grad_fn(out)
    (out * probe).sum().backward()


def _one(run: Callable[[dict[str, Any]], tuple[torch.Tensor, dict[str, Any]]], overrides: dict[str, Any]) -> RecomputeRun:
    try:
        logits, grads = run(overrides)
    except BrokenTable:
        raise
    except Exception as exc:  # noqa: BLE001 - reported as the implementation's, with the setting
        return RecomputeRun(error=f"{type(exc).__name__}: {exc}")
    return RecomputeRun(logits=logits, grads=grads)


def recompute_evidence(family: str, run: Callable[[dict[str, Any]], tuple[torch.Tensor, dict[str, Any]]],
                       case: Any = None) -> RecomputeExtras:
    """The run without recompute, then one per setting of ``SETTINGS[family]`` (stopping at the first error on any rank)."""
    left_out = settings_not_run(family, case) if case is not None else {}
    plain = _one(run, {})
    runs: dict[str, RecomputeRun] = {}
    if any_rank(plain.error is not None):
        return RecomputeExtras(plain=plain, runs=runs, left_out=left_out)
    for name, overrides in SETTINGS[family].items():
        if name in left_out:
            continue
        runs[name] = _one(run, overrides)
        if any_rank(runs[name].error is not None):
            break
    return RecomputeExtras(plain=plain, runs=runs, left_out=left_out)
