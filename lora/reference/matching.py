"""Which modules the reference selects (SPEC "Module matching"), and the warnings for patterns that matched nothing.

Target mode (target_modules non-empty): a module is selected when its leaf
name equals a pattern or its full dotted name matches a pattern as a whole
(`*` is any run of characters, dots included; everything else is literal).
Exclude mode (target_modules empty, exclude_modules non-empty): every
linear-type module no exclude pattern matches. Both empty: nothing.
`_PatternSelection` is the part of `LoRA` that decides and remembers.
"""

from __future__ import annotations

import warnings

from torch import nn

from lora.reference.layers import _is_linear_type


def _wildcard_match(pattern: str, text: str) -> bool:
    """True when `text` matches `pattern` as a whole: `*` is any run of characters (dots too), the rest is literal.

    Two-pointer matching with backtracking to the last `*`.
    """
    p = 0
    t = 0
    last_star = -1
    resume_at = 0
    while t < len(text):
        if p < len(pattern) and pattern[p] == "*":
            last_star = p
            resume_at = t
            p += 1
        elif p < len(pattern) and pattern[p] == text[t]:
            p += 1
            t += 1
        elif last_star >= 0:
            # Let the last star swallow one more character and retry.
            resume_at += 1
            t = resume_at
            p = last_star + 1
        else:
            return False
    while p < len(pattern) and pattern[p] == "*":
        p += 1
    return p == len(pattern)


def _pattern_selects(pattern: str, full_name: str) -> bool:
    """SPEC "Module matching": the leaf name equals the pattern, or the full name matches it as a whole."""
    leaf = full_name.split(".")[-1]
    return leaf == pattern or _wildcard_match(pattern, full_name)


def _is_expert_module(full_name: str) -> bool:
    """Under `...mlp.experts...` (routed experts; `shared_experts` is not one)."""
    parts = full_name.split(".")
    for i in range(len(parts) - 1):
        if parts[i] == "mlp" and parts[i + 1] == "experts":
            return True
    return False


class _PatternSelection:
    """LoRA's module selection: `_selected` decides and records which patterns were used, `_warn_about_unused_patterns` reports the rest.

    A mixin of `LoRA`, reading its `target_modules` and `exclude_modules`; the
    record (`_used_patterns`, `_matched_something`) starts afresh with
    `_forget_patterns`, once per call.
    """

    def _forget_patterns(self) -> None:
        self._used_patterns: set[str] = set()
        self._matched_something = False

    def _selected(self, module: nn.Module, full_name: str) -> bool:
        """Whether this module gets an adapter; remembers which patterns were used."""
        if self.target_modules:
            hit = False
            for pattern in self.target_modules:
                if _pattern_selects(pattern, full_name):
                    self._used_patterns.add(pattern)
                    hit = True
            if hit:
                self._matched_something = True
            return hit
        if not self.exclude_modules or not _is_linear_type(module):
            return False
        excluded = False
        for pattern in self.exclude_modules:
            if _pattern_selects(pattern, full_name):
                self._used_patterns.add(pattern)
                excluded = True
        if not excluded:
            self._matched_something = True
        return not excluded

    def _warn_about_unused_patterns(self) -> None:
        if self.target_modules:
            patterns, kind, what = self.target_modules, "target_modules", "module"
        else:
            patterns, kind, what = self.exclude_modules, "exclude_modules", "linear-type module"
        reported = []
        for pattern in patterns:
            if pattern not in self._used_patterns and pattern not in reported:
                reported.append(pattern)
                warnings.warn(
                    f"LoRA {kind} pattern {pattern!r} matched no {what}; patterns match a leaf name "
                    "exactly or the full dotted name as a whole ('*' = any characters)",
                    UserWarning,
                    stacklevel=3,
                )
        if not self._matched_something:
            if not self.target_modules and not self.exclude_modules:
                reason = "target_modules and exclude_modules are both empty"
            else:
                reason = "no module matched"
            warnings.warn(f"LoRA adds no adapter: {reason}", UserWarning, stacklevel=3)
