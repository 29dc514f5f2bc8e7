"""Which modules lora.megatron adapts: pattern matching (SPEC "Module matching") and what counts as a linear.

``ModuleMatcher`` decides, module by module during the walk, whether a
module gets an adapter (target mode or exclude mode) and remembers which
patterns were used, to warn about those that matched nothing. Neither
megatron nor Transformer Engine is imported here: their linears are
recognised by class (already loaded) or by name.
"""

from __future__ import annotations

import re
import sys
import warnings
from functools import lru_cache
from typing import Iterable, Iterator

from torch import nn

from lora._spec import MEGATRON_LAYERS_MODULE, TE_LINEAR_CLASS_NAMES, TE_MODULE_PREFIX, TE_OWN_LINEAR_CLASS_NAMES

__all__ = [
    "pattern_matches",
    "is_linear_type",
    "is_grouped_linear_shape",
    "is_expert_linear_name",
    "both_modes_error",
    "ModuleMatcher",
]

_MEGATRON_LAYERS_MODULE = MEGATRON_LAYERS_MODULE
_TE_OWN_LINEAR_CLASS_NAMES = TE_OWN_LINEAR_CLASS_NAMES


@lru_cache(maxsize=1024)
def _pattern_regex(pattern: str) -> re.Pattern[str]:
    # Only `*` is special; `.`, `[`, `?` and everything else are literal, which
    # is why fnmatch (where `[` and `?` are special) is not used.
    return re.compile("".join(".*" if c == "*" else re.escape(c) for c in pattern), re.DOTALL)


def pattern_matches(pattern: str, full_name: str) -> bool:
    """True when `full_name` matches `pattern` as a whole; `*` is any run of characters, dots included."""
    return _pattern_regex(pattern).fullmatch(full_name) is not None


def _class_names_in_mro(module: object) -> Iterator[tuple[str, str]]:
    for cls in type(module).__mro__:
        yield cls.__name__, getattr(cls, "__module__", "") or ""


def is_grouped_linear_shape(module: object) -> bool:
    """A grouped expert linear, duck-typed: an int `num_gemms` = n >= 1 and its OWN 2-D parameters `weight0..weight{n-1}`.

    (TE's GroupedLinear, megatron's TEGroupedLinear, harness.families.moe.model.TorchGroupedLinear.)
    Own parameters only, so an adapter wrapper, which forwards attribute
    reads to its base, is not one.
    """
    if not isinstance(module, nn.Module):
        return False
    n = getattr(module, "num_gemms", None)
    if type(n) is not int or n < 1:
        return False
    own = module._parameters
    for i in range(n):
        w = own.get(f"weight{i}")
        if w is None or w.dim() != 2:
            return False
    return True


def is_linear_type(module: object) -> bool:
    """Plain nn.Linear, megatron-core Column/RowParallelLinear, a grouped expert linear, or a Transformer Engine linear.

    Neither megatron nor TE is imported here: a module can only be a
    megatron-core parallel linear if megatron's layers module is already
    loaded, and TE classes are recognised by name.
    """
    if isinstance(module, nn.Linear):
        return True
    if is_grouped_linear_shape(module):
        return True
    layers = sys.modules.get(_MEGATRON_LAYERS_MODULE)
    if layers is not None and isinstance(
        module, (layers.ColumnParallelLinear, layers.RowParallelLinear)
    ):
        return True
    for name, mod in _class_names_in_mro(module):
        if name in TE_LINEAR_CLASS_NAMES:
            return True
        if name in _TE_OWN_LINEAR_CLASS_NAMES and mod.startswith(TE_MODULE_PREFIX):
            return True
    return False


_EXPERT_NAME = re.compile(r"(^|\.)mlp\.experts(\.|$)")


def is_expert_linear_name(full_name: str) -> bool:
    """True for a module under `...mlp.experts...` (routed experts; `shared_experts` is not one)."""
    return _EXPERT_NAME.search(full_name) is not None


def _leaf_name(full_name: str) -> str:
    return full_name.rsplit(".", 1)[-1]


def both_modes_error(target_modules: Iterable[str], exclude_modules: Iterable[str]) -> ValueError:
    """The ValueError for target_modules and exclude_modules both non-empty."""
    return ValueError(
        f"target_modules={list(target_modules)!r} and exclude_modules={list(exclude_modules)!r} "
        "are both non-empty; exclude mode needs target_modules empty: pass target_modules=[] "
        "together with exclude_modules (the default target_modules list is non-empty)"
    )


class ModuleMatcher:
    """Decides which modules get an adapter, and remembers which patterns were used.

    Target mode (target_modules non-empty): a module matches when its leaf
    name equals a pattern or its full dotted name matches a pattern as a whole.
    Exclude mode (target_modules empty, exclude_modules non-empty): every
    linear-type module whose leaf name equals no exclude pattern and whose full
    name matches none. Both empty: nothing matches.
    """

    def __init__(self, target_modules: Iterable[str], exclude_modules: Iterable[str] = ()):
        self.target_modules = list(target_modules)
        self.exclude_modules = list(exclude_modules)
        if self.target_modules and self.exclude_modules:
            raise both_modes_error(self.target_modules, self.exclude_modules)
        self.reset()

    def reset(self) -> None:
        """Forget which patterns were used (call at the start of each walk)."""
        self._used: set[str] = set()
        self._matched_any = False

    @staticmethod
    def _pattern_hits(pattern: str, leaf: str, full_name: str) -> bool:
        return leaf == pattern or pattern_matches(pattern, full_name)

    def matching_pattern(self, module: object, full_name: str) -> str | None:
        """The first target pattern that selects this module (target mode), or None."""
        leaf = _leaf_name(full_name)
        for pattern in self.target_modules:
            if self._pattern_hits(pattern, leaf, full_name):
                return pattern
        return None

    def matches(self, module: object, full_name: str) -> bool:
        """Whether `module` at `full_name` should carry an adapter; records pattern use."""
        leaf = _leaf_name(full_name)
        if self.target_modules:
            hits = [p for p in self.target_modules if self._pattern_hits(p, leaf, full_name)]
            self._used.update(hits)
            self._matched_any |= bool(hits)
            return bool(hits)
        if not self.exclude_modules or not is_linear_type(module):
            return False
        # Only linear-type modules count as "used" for an exclude pattern, so
        # exclude_modules=["vision_model"] (which names a container, not the
        # linears inside it, under whole-name matching) is reported as unused.
        hits = [p for p in self.exclude_modules if self._pattern_hits(p, leaf, full_name)]
        self._used.update(hits)
        matched = not hits
        self._matched_any |= matched
        return matched

    def unmatched_patterns(self) -> list[str]:
        """Patterns (target, or exclude in exclude mode) that matched no module since the last reset."""
        patterns = self.target_modules or self.exclude_modules
        return [p for p in dict.fromkeys(patterns) if p not in self._used]

    def warn_unmatched(self) -> None:
        """One UserWarning per pattern that matched nothing during the walk."""
        for pattern in self.unmatched_patterns():
            kind = "target_modules" if self.target_modules else "exclude_modules"
            what = "module" if self.target_modules else "linear-type module"
            warnings.warn(
                f"LoRA {kind} pattern {pattern!r} matched no {what}; patterns match a leaf "
                "name exactly or the full dotted name as a whole ('*' = any characters)",
                UserWarning,
                stacklevel=3,
            )
        if not self._matched_any:
            if not self.target_modules and not self.exclude_modules:
                reason = "target_modules and exclude_modules are both empty"
            else:
                reason = "no module matched"
            warnings.warn(f"LoRA adds no adapter: {reason}", UserWarning, stacklevel=3)
