"""lora.megatron's parallelism-independent parts: config fields, matching, init, walk, freeze, merge math.

Used only by `lora.megatron`. `lora.reference` (the oracle the harness
compares against) implements all of this again on its own, from harness/SPEC.md, so
that the two can disagree; only the SPEC's constants (`lora._spec`) are shared.
"""

from __future__ import annotations

import math
import re
import sys
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from lora._spec import (
    DEFAULT_TARGET_MODULES,
    DROPOUT_POSITIONS,
    INIT_METHODS,
    MEGATRON_LAYERS_MODULE,
    NORMAL_INIT_STD,
    TE_LINEAR_CLASS_NAMES,
    TE_MODULE_PREFIX,
    TE_OWN_LINEAR_CLASS_NAMES,
    VLM_PARTS,
)

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "INIT_METHODS",
    "DROPOUT_POSITIONS",
    "TE_LINEAR_CLASS_NAMES",
    "init_full_weight",
    "init_adapter_weights",
    "pattern_matches",
    "is_linear_type",
    "is_grouped_linear_shape",
    "is_expert_linear_name",
    "ModuleMatcher",
    "LoRAFields",
    "LoRABase",
    "AdapterWrapper",
    "is_adapter_wrapper",
    "adapter_parameters",
    "freeze_parameters",
    "walk_and_replace",
    "join_name",
    "apply_dropout",
    "add_to_base_output",
    "freeze_vlm",
    "VLMFreezeMixin",
    "merge_weight",
    "find_moe_router_topk",
    "moe_adapter_rank",
]

_MEGATRON_LAYERS_MODULE = MEGATRON_LAYERS_MODULE
_TE_OWN_LINEAR_CLASS_NAMES = TE_OWN_LINEAR_CLASS_NAMES


# --------------------------------------------------------------------------- init


def _check_init_method(method: object, what: str = "init method") -> None:
    if method not in INIT_METHODS:
        raise ValueError(
            f"unknown {what} {method!r}; valid names are: {', '.join(INIT_METHODS)}"
        )


def init_full_weight(
    shape: tuple[int, int],
    method: str,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """A freshly initialised (out, in) matrix over the FULL, unsharded shape.

    Fans come from `shape`, never from a shard, and the values are always drawn
    in float32 on the CPU (from `generator`, or torch's default CPU generator)
    before the cast to `dtype` and the move to `device`: a sharded
    implementation that calls this on the full shape and slices gets, for a
    given seed, exactly the matrix the single-device reference gets.

    | method         | distribution                          |
    | xavier         | Xavier normal, std = sqrt(2/(in+out)) |
    | xavier_uniform | Xavier uniform, bound = sqrt(6/(in+out)) |
    | kaiming        | Kaiming uniform a=sqrt(5), bound = 1/sqrt(in) |
    | normal         | Normal(0, 0.2) (std 0.2)              |
    | zero           | all zeros (draws nothing)             |
    """
    _check_init_method(method)
    if len(shape) != 2 or any(int(s) < 0 for s in shape):
        raise ValueError(f"init_full_weight needs a 2-D (out, in) shape, got {tuple(shape)}")
    weight = torch.empty(tuple(int(s) for s in shape), dtype=torch.float32)
    if weight.numel() == 0 or method == "zero":
        weight.zero_()
    elif method == "xavier":
        nn.init.xavier_normal_(weight, generator=generator)
    elif method == "xavier_uniform":
        nn.init.xavier_uniform_(weight, generator=generator)
    elif method == "kaiming":
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
    else:  # "normal"
        nn.init.normal_(weight, mean=0.0, std=NORMAL_INIT_STD, generator=generator)
    return weight.to(dtype=dtype, device=device)


def init_adapter_weights(
    out_features: int,
    in_features: int,
    rank: int,
    a_method: str,
    b_method: str,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Full A (rank, in) and B (out, rank), drawn in that order.

    lora.megatron draws every adapter through this function, one module at a
    time in walk order, on every rank, and keeps its shard: the same seed
    yields the same full adapters whatever the parallel layout, and the same
    as lora.reference draws (SPEC: init over the full shape, A then B per
    module, pre-order walk, torch's global CPU generator).
    """
    a = init_full_weight((rank, in_features), a_method, generator=generator, dtype=dtype, device=device)
    b = init_full_weight((out_features, rank), b_method, generator=generator, dtype=dtype, device=device)
    return a, b


# ----------------------------------------------------------------------- matching


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

    (TE's GroupedLinear, megatron's TEGroupedLinear, harness.moe.TorchGroupedLinear.)
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


def join_name(prefix: str, name: str) -> str:
    """Full dotted name of child `name` under the module whose full name is `prefix` ('' at the top)."""
    return f"{prefix}.{name}" if prefix else name


def _both_modes_error(target_modules: Iterable[str], exclude_modules: Iterable[str]) -> ValueError:
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
            raise _both_modes_error(self.target_modules, self.exclude_modules)
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


# ------------------------------------------------------------------------- config


def _normalise_dtype(value: object) -> torch.dtype | None:
    if value is None:
        return None
    dtype = value
    if isinstance(value, str):
        name = value.removeprefix("torch.")
        dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(
            f"lora_dtype={value!r} is invalid: it must be None (use the base weight's dtype) "
            "or a floating torch.dtype such as torch.bfloat16 (or its name, 'bfloat16')"
        )
    return dtype


def _check_patterns(field_name: str, value: object) -> list[str]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise ValueError(
            f"{field_name}={value!r} is invalid: it must be a list of names or patterns, "
            f"e.g. {field_name}=[{value!r}]"
        )
    patterns = list(value)
    for p in patterns:
        if not isinstance(p, str) or not p:
            raise ValueError(
                f"{field_name} contains {p!r}; every entry must be a non-empty string"
            )
    return patterns


@dataclass
class LoRAFields:
    """Every LoRA config field of the SPEC, with its default and validation."""

    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    exclude_modules: list[str] = field(default_factory=list)
    dim: int = 32
    alpha: float = 32
    dropout: float = 0.0
    dropout_position: str = "pre"
    a2a_experimental: bool = False
    lora_A_init_method: str = "xavier"
    lora_B_init_method: str = "zero"
    lora_dtype: torch.dtype | None = None
    normalize_moe_lora: bool = False
    share_expert_adapters: bool = True

    def __post_init__(self) -> None:
        self.target_modules = _check_patterns("target_modules", self.target_modules)
        self.exclude_modules = _check_patterns("exclude_modules", self.exclude_modules)
        if self.target_modules and self.exclude_modules:
            raise _both_modes_error(self.target_modules, self.exclude_modules)
        if isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim < 1:
            raise ValueError(f"dim={self.dim!r} is invalid: the adapter rank must be an int >= 1")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha):
            raise ValueError(f"alpha={self.alpha!r} is invalid: it must be a finite number")
        if (
            isinstance(self.dropout, bool)
            or not isinstance(self.dropout, (int, float))
            or not 0.0 <= self.dropout < 1.0
        ):
            raise ValueError(f"dropout={self.dropout!r} is invalid: it must be a number in [0, 1)")
        if self.dropout_position not in DROPOUT_POSITIONS:
            raise ValueError(
                f"dropout_position={self.dropout_position!r} is invalid: it must be 'pre' or 'post'"
            )
        _check_init_method(self.lora_A_init_method, "lora_A_init_method")
        _check_init_method(self.lora_B_init_method, "lora_B_init_method")
        self.lora_dtype = _normalise_dtype(self.lora_dtype)
        for name in ("a2a_experimental", "normalize_moe_lora", "share_expert_adapters"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: it must be True or False")

    @property
    def scale(self) -> float:
        """alpha / dim, the factor on the adapter branch."""
        return self.alpha / self.dim


# ------------------------------------------------------------------ adapter parts


class AdapterWrapper(nn.Module):
    """Marker base of every adapted module: the base layer `to_wrap` plus its `adapter`.

    The default forward adds `adapter(x)` to the base output (tensor or
    `(output, bias)` tuple). Attributes the wrapper lacks are looked up on the
    base layer, so code that reads e.g. `layer.linear_qkv.weight` still works.
    """

    def __init__(self, to_wrap: nn.Module, adapter: nn.Module):
        super().__init__()
        self.to_wrap = to_wrap
        self.adapter = adapter

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return add_to_base_output(self.to_wrap(x, *args, **kwargs), self.adapter(x))

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
    """True for a module that already carries an adapter (from either implementation)."""
    return isinstance(module, AdapterWrapper)


def _chunks(model: nn.Module | list[nn.Module] | tuple[nn.Module, ...]) -> list[nn.Module]:
    return list(model) if isinstance(model, (list, tuple)) else [model]


def adapter_parameters(model: nn.Module | list[nn.Module]) -> list[nn.Parameter]:
    """Every parameter that belongs to an adapter (not to a base layer), without duplicates."""
    seen: dict[int, nn.Parameter] = {}
    for chunk in _chunks(model):
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


# ---------------------------------------------------------------------------- MoE


def find_moe_router_topk(*candidates: object) -> int | None:
    """moe_router_topk from the first candidate (module or model) whose `.config` exposes it.

    Models wrapped in `.module` chains (DDP, Float16Module) are unwrapped.
    """
    for obj in candidates:
        seen = 0
        while obj is not None and seen < 16:
            topk = getattr(getattr(obj, "config", None), "moe_router_topk", None)
            if isinstance(topk, int) and not isinstance(topk, bool) and topk >= 1:
                return topk
            obj = getattr(obj, "module", None) if isinstance(obj, nn.Module) else None
            seen += 1
    return None


def moe_adapter_rank(dim: int, topk: int | None, full_name: str) -> int:
    """The normalized expert rank dim // topk, or a ValueError saying why it cannot be used."""
    if topk is None:
        raise ValueError(
            f"normalize_moe_lora=True but no moe_router_topk was found for expert linear "
            f"{full_name} (looked at the module's and the model's .config)"
        )
    if dim % topk:
        raise ValueError(
            f"normalize_moe_lora=True needs dim divisible by moe_router_topk: dim={dim} is not "
            f"divisible by topk={topk} for {full_name}"
        )
    return dim // topk


# --------------------------------------------------------------------------- walk


def walk_and_replace(
    root: nn.Module,
    visit: Callable[[nn.Module, str, str], tuple[nn.Module, bool]],
    leave: Callable[[nn.Module, str, str], None] | None = None,
) -> nn.Module:
    """Pre-order walk over `root` and its descendants, replacing modules in place.

    `visit(module, name, prefix)` returns `(replacement, descend)`; names are
    as in `root.named_modules()` (the root itself is visited with name '' and
    prefix ''). A module reachable under several names is visited once, at its
    first name, and every occurrence gets the same replacement. When
    `descend` is true and `leave` is given, `leave(replacement, name, prefix)`
    runs once the replacement's whole subtree has been walked (a post-order
    hook). Returns the (possibly replaced) root.
    """
    done: dict[int, nn.Module] = {}

    def go(module: nn.Module, name: str, prefix: str) -> nn.Module:
        if id(module) in done:
            return done[id(module)]
        new, descend = visit(module, name, prefix)
        done[id(module)] = new
        done[id(new)] = new
        if descend:
            full = join_name(prefix, name)
            for child_name, child in list(new._modules.items()):
                if child is None:
                    continue
                replacement = go(child, child_name, full)
                if replacement is not child:
                    new._modules[child_name] = replacement
            if leave is not None:
                leave(new, name, prefix)
        return new

    return go(root, "", "")


# ----------------------------------------------------------------------- LoRABase


@dataclass
class LoRABase(LoRAFields):
    """Applying a LoRA to a model: walk, match, wrap, freeze. Subclasses build the adapters.

    `__call__(model, training=True)`:
      1. `freeze_model(model, training)`: by default every parameter is
         frozen (VLM variants freeze only chosen subtrees);
      2. pre-order walk calling `transform(module, name, prefix)` and putting
         what it returns in place of the module; an existing adapter wrapper is
         neither transformed again nor descended into, so a second call changes
         nothing;
      3. training: every adapter parameter is made trainable, train mode.
         Not training (inference, as in Megatron-Bridge): `freeze_model` runs
         again, so every parameter it covers ends frozen, adapters included,
         and the model is put in eval mode;
      4. a warning for each pattern that matched nothing.
    Freezing comes before wrapping (as in Megatron-Bridge) so that adapters
    added inside a frozen subtree start trainable and a subtree left unfrozen
    by a VLM flag stays fully trainable under its adapters.

    `model` may be a module or a list of model chunks (the result has the same
    shape). Adapters are drawn from torch's default CPU generator, A then B,
    one module at a time in walk order.
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        self._matcher: ModuleMatcher | None = None
        self._walk_roots: list[nn.Module] = []

    @property
    def matcher(self) -> ModuleMatcher:
        """The matcher of the current (or last) walk; built from the fields when first needed."""
        if self.__dict__.get("_matcher") is None:
            self._matcher = ModuleMatcher(self.target_modules, self.exclude_modules)
        return self._matcher

    def transform(self, module: nn.Module, name: str | None = None, prefix: str | None = None) -> nn.Module:
        """The adapted module, or `module` itself when it is not selected."""
        raise NotImplementedError(f"{type(self).__name__} must implement transform()")

    def freeze_model(self, model: nn.Module | list[nn.Module], training: bool = True) -> None:
        """Freeze every parameter (adapters included); train mode when `training`."""
        chunks = _chunks(model)
        freeze_parameters(chunks)
        if training:
            for chunk in chunks:
                chunk.train(True)

    def adapter_rank(self, module: nn.Module, full_name: str) -> int:
        """The rank for this module: dim, or dim // moe_router_topk for an expert linear under normalize_moe_lora."""
        if not (self.normalize_moe_lora and is_expert_linear_name(full_name)):
            return self.dim
        topk = find_moe_router_topk(module, *self.__dict__.get("_walk_roots", []))
        return moe_adapter_rank(self.dim, topk, full_name)

    def enter_subtree(self, module: nn.Module, full_name: str) -> None:
        """Called before the walk descends into `module` (already transformed); a hook for subclasses."""

    def leave_subtree(self, module: nn.Module, full_name: str) -> None:
        """Called once the walk has finished `module`'s subtree; a hook for subclasses."""

    def _visit(self, module: nn.Module, name: str, prefix: str) -> tuple[nn.Module, bool]:
        if is_adapter_wrapper(module):
            # Already adapted (a previous call): count it as matched so the
            # second call warns about nothing, and leave it untouched.
            # Match on the wrapped base: in exclude mode the wrapper itself is
            # not a linear type and would wrongly count as "matched nothing".
            self.matcher.matches(module.to_wrap, join_name(prefix, name))
            return module, False
        new = self.transform(module, name, prefix)
        descend = not is_adapter_wrapper(new)
        if descend:
            self.enter_subtree(new, join_name(prefix, name))
        return new, descend

    def _leave(self, module: nn.Module, name: str, prefix: str) -> None:
        self.leave_subtree(module, join_name(prefix, name))

    def __call__(self, model: nn.Module | list[nn.Module], training: bool = True) -> Any:
        chunks = _chunks(model)
        self._matcher = ModuleMatcher(self.target_modules, self.exclude_modules)
        self._walk_roots = chunks
        try:
            self.freeze_model(model, training)
            result = [walk_and_replace(chunk, self._visit, self._leave) for chunk in chunks]
        finally:
            self._walk_roots = []
        if training:
            for p in adapter_parameters(result):
                p.requires_grad_(True)
        else:
            self.freeze_model(type(model)(result) if isinstance(model, (list, tuple)) else result[0], False)
        for chunk in result:
            chunk.train(training)
        self.matcher.warn_unmatched()
        if isinstance(model, (list, tuple)):
            return type(model)(result)
        return result[0]


# ---------------------------------------------------------------------------- VLM


_VLM_PARTS = VLM_PARTS


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
        for chunk in _chunks(model):
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


# -------------------------------------------------------------------------- merge


def merge_weight(
    base_weight: torch.Tensor,
    B: torch.Tensor,
    A: torch.Tensor,
    alpha: float,
    dim: int,
) -> torch.Tensor:
    """base_weight + (alpha/dim) * B @ A, computed in float32 and cast once to base_weight's dtype.

    A float64 base is computed in float64 (float32 would only lose digits).
    Shapes: base (out, in), B (out, r), A (r, in); `dim` is the denominator of
    the scale (the adapter's rank). The result is a new tensor.
    """
    if base_weight.dim() != 2 or B.dim() != 2 or A.dim() != 2:
        raise ValueError(
            f"merge_weight needs 2-D tensors, got base {tuple(base_weight.shape)}, "
            f"B {tuple(B.shape)}, A {tuple(A.shape)}"
        )
    out, inp = base_weight.shape
    if B.shape[1] != A.shape[0]:
        raise ValueError(
            f"merge_weight: B {tuple(B.shape)} and A {tuple(A.shape)} disagree on the rank "
            "(B is (out, r), A is (r, in))"
        )
    if B.shape[0] != out or A.shape[1] != inp:
        raise ValueError(
            f"merge_weight: B @ A has shape ({B.shape[0]}, {A.shape[1]}) but the base weight "
            f"is {tuple(base_weight.shape)}"
        )
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"merge_weight: dim={dim!r} must be an int >= 1")
    compute = torch.promote_types(base_weight.dtype, torch.float32) if base_weight.is_floating_point() else torch.float32
    delta = (B.to(compute) @ A.to(device=B.device, dtype=compute)).to(base_weight.device)
    merged = base_weight.to(compute) + (alpha / dim) * delta
    return merged.to(base_weight.dtype)
