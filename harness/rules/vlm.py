"""The contract's VLMLoRA rules, computed from names: which modules SPEC's matching adapts, the
parameter names after adapting (the TP table's names), and which parameters each combination of
freeze flags and training leaves trainable.

The parent computes these from the names the VLM task reports
(``harness.families.vlm.tasks``) and ``harness.properties.vlm_freezing``
compares them with what the implementation did.
"""

from __future__ import annotations

import functools
import re
from typing import Iterable, Optional

__all__ = [
    "VLM_PARTS", "FREEZE_FLAGS", "pattern_selects", "expected_adapted_modules", "is_adapter_param",
    "expected_param_names", "part_of", "expected_trainable",
]

#: The three parts of a LLaVA VLMLoRA can freeze, by attribute name.
VLM_PARTS = ("vision_model", "vision_projection", "language_model")
#: VLMLoRA's freeze flags, one per part, in the same order.
FREEZE_FLAGS = ("freeze_vision_model", "freeze_vision_projection", "freeze_language_model")


@functools.lru_cache(maxsize=1024)
def _wildcard(pattern: str) -> "re.Pattern[str]":
    return re.compile("".join(".*" if c == "*" else re.escape(c) for c in pattern), re.DOTALL)


def pattern_selects(pattern: str, full_name: str) -> bool:
    """SPEC "Module matching": the leaf name equals the pattern, or the full name matches it as a whole."""
    return full_name.rsplit(".", 1)[-1] == pattern or _wildcard(pattern).fullmatch(full_name) is not None


def expected_adapted_modules(
    linear_modules: Iterable[str], target_modules: Iterable[str], exclude_modules: Iterable[str],
    other_modules: Iterable[str] = (),
) -> set[str]:
    """The modules SPEC's matching selects, by full name as the walk sees them.

    ``linear_modules``: the linear-type modules (exclude mode adapts only
    those); ``other_modules``: every other module, which a target pattern
    must not select (SPEC: ``TypeError``); selecting one raises
    ``ValueError`` here, since the harness only draws patterns that select
    linears. A module inside a selected one is not walked (no nested
    adapters); the tiny models have no linear inside a linear.
    """
    target, exclude = list(target_modules), list(exclude_modules)
    if target:
        bad = [m for m in other_modules if any(pattern_selects(p, m) for p in target)]
        if bad:
            raise ValueError(f"target patterns {target} select modules with no adapter: {bad[:4]}")
        return {m for m in linear_modules if any(pattern_selects(p, m) for p in target)}
    return {m for m in linear_modules if not any(pattern_selects(p, m) for p in exclude)}


_ADAPTER_PARAM = re.compile(r"\.adapter\.linear_(in|out)\.weight$")


def is_adapter_param(name: str) -> bool:
    """``<module>.adapter.linear_in.weight`` / ``.linear_out.weight`` (Bridge's names)."""
    return _ADAPTER_PARAM.search(name) is not None


def expected_param_names(base_params: Iterable[str], adapted: Iterable[str]) -> set[str]:
    """The parameter names after adapting ``adapted`` (SPEC's TP table: Bridge's names).

    A parameter ``<module>.<p>`` of an adapted module becomes
    ``<module>.to_wrap.<p>``; each adapted module adds
    ``<module>.adapter.linear_in.weight`` and ``<module>.adapter.linear_out.weight``.
    """
    adapted = set(adapted)
    out = set()
    for name in base_params:
        module, _, leaf = name.rpartition(".")
        out.add(f"{module}.to_wrap.{leaf}" if module in adapted else name)
    for module in adapted:
        out.add(f"{module}.adapter.linear_in.weight")
        out.add(f"{module}.adapter.linear_out.weight")
    return out


def part_of(name: str) -> Optional[str]:
    """The VLM part a parameter name lies in (None: outside all three)."""
    for part in VLM_PARTS:
        if name == part or name.startswith(part + "."):
            return part
    return None


def expected_trainable(
    param_names: Iterable[str],
    *,
    freeze_vision_model: bool,
    freeze_vision_projection: bool,
    freeze_language_model: bool,
    training: bool,
) -> set[str]:
    """The parameters SPEC's VLMLoRA leaves with ``requires_grad=True`` (names relative to the LLaVA model).

    ``freeze_model`` freezes every parameter of each flagged subtree and
    leaves all others alone. Training: it runs before the transform, and
    every adapter ends trainable; so trainable = adapters everywhere plus
    every parameter outside the flagged subtrees. ``training=False``: it
    runs again after the transform, so adapters inside flagged subtrees end
    frozen too, while parameters elsewhere (adapters included, trainable
    as created) keep their flag: trainable = everything outside the
    flagged subtrees.
    """
    flagged = {
        part for part, flag in zip(VLM_PARTS, (freeze_vision_model, freeze_vision_projection, freeze_language_model)) if flag
    }
    out = set()
    for name in param_names:
        if part_of(name) not in flagged or (training and is_adapter_param(name)):
            out.add(name)
    return out
