"""Single-device reference LoRA, written directly from harness/SPEC.md: the numbers every sharded implementation must reproduce.

This module is the harness's oracle. It shares no code with `lora.megatron`
(the implementation under test): it imports only torch, the standard library
and the SPEC's constants (`lora._spec`, plain data). Everything is written out
plainly: loops over `named_modules()`, explicit `x @ A.T` products.

It adapts `torch.nn.Linear`, megatron-core `ColumnParallelLinear` /
`RowParallelLinear` whose TP group has size 1, and grouped expert linears
whose TP group has size 1 (a layer of a TP-sharded model is a `ValueError`:
use `lora.megatron`); any other selected module is a `TypeError`.

    y' = base(x) + (alpha / r) * Dpost(B(A(Dpre(x))))

The adapter computes in lora_dtype (or the base weight's dtype) and its result
is cast to the base output's dtype before the sum.

A grouped expert linear is recognised by its shape, not its class (TE's
`GroupedLinear`, megatron's `TEGroupedLinear`, `harness.moe.TorchGroupedLinear`
all qualify): an int `num_gemms` = n and its own 2-D parameters `weight0` ..
`weight{n-1}`, each (out, in), called as `forward(x, m_splits)` with the rows
of x grouped by expert and m_splits the tokens per expert. It counts as
linear-type in exclude mode. Its wrapper is a `LoRAGroupedLinear`:
- `share_expert_adapters=True`: one `LoRAAdapter` for the module, applied to
  every row of x whatever its expert; parameters `adapter.linear_in.weight`
  (r, in) and `adapter.linear_out.weight` (out, r), drawn A then B.
- `share_expert_adapters=False`: one adapter per expert, parameters
  `adapter.linear_in.weight{i}` (r, in) and `adapter.linear_out.weight{i}`
  (out, r); expert i's adapter acts on the rows m_splits gives expert i.
  Drawn A0, B0, A1, B1, ... over the full shapes.
Merging folds `scale * B_i @ A_i` (shared: the same B @ A) into `weight{i}`.

Fields the reference accepts but that have nothing to act on here:
- `a2a_experimental`: only changes communication under sequence parallelism;
  a no-op on one device.
- `share_expert_adapters`: honoured for grouped expert linears (above). A
  module holding one expert (SequentialMLP) gets its own adapter either way.
- `normalize_moe_lora`: honoured. A module whose full name lies under
  `...mlp.experts...` gets rank `dim // moe_router_topk`, topk read from the
  module's or the model's `.config`; missing topk or a dim not divisible by it
  is a `ValueError`. alpha is unchanged, so the scale is alpha / (dim // topk).
"""

from __future__ import annotations

import math
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lora import _spec

__all__ = [
    "LoRA",
    "VLMLoRA",
    "LoRAMerge",
    "LoRALinear",
    "LoRAAdapter",
    "LoRAGroupedLinear",
    "LoRAExpertAdapters",
    "merge_lora",
]


# ======================================================================= helpers


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


def _megatron_parallel_linear_classes() -> tuple[type, ...]:
    """megatron-core's (ColumnParallelLinear, RowParallelLinear), if megatron is loaded; () otherwise."""
    layers = sys.modules.get(_spec.MEGATRON_LAYERS_MODULE)
    if layers is None:
        return ()
    return (layers.ColumnParallelLinear, layers.RowParallelLinear)


def _is_transformer_engine_linear(module: nn.Module) -> bool:
    for cls in type(module).__mro__:
        if cls.__name__ in _spec.TE_LINEAR_CLASS_NAMES:
            return True
        where = getattr(cls, "__module__", "") or ""
        if cls.__name__ in _spec.TE_OWN_LINEAR_CLASS_NAMES and where.startswith(_spec.TE_MODULE_PREFIX):
            return True
    return False


def _grouped_weights(module: nn.Module) -> Optional[list[torch.Tensor]]:
    """[weight0 .. weight{n-1}] of a grouped expert linear, else None.

    Duck-typed: an int `num_gemms` = n >= 1 and n 2-D parameters
    `weight{i}` registered on the module itself (an adapter wrapper, which
    forwards attribute reads to its base, has none of its own).
    """
    n = getattr(module, "num_gemms", None)
    if type(n) is not int or n < 1:
        return None
    own = module._parameters
    weights = []
    for i in range(n):
        w = own.get(f"weight{i}")
        if w is None or w.dim() != 2:
            return None
        weights.append(w)
    return weights


def _is_grouped_linear(module: nn.Module) -> bool:
    return _grouped_weights(module) is not None


def _is_linear_type(module: nn.Module) -> bool:
    """Plain nn.Linear, megatron-core column/row parallel linear, a grouped expert linear, or a Transformer Engine linear."""
    if isinstance(module, nn.Linear):
        return True
    if _is_grouped_linear(module):
        return True
    megatron_classes = _megatron_parallel_linear_classes()
    if megatron_classes and isinstance(module, megatron_classes):
        return True
    return _is_transformer_engine_linear(module)


def _is_expert_module(full_name: str) -> bool:
    """Under `...mlp.experts...` (routed experts; `shared_experts` is not one)."""
    parts = full_name.split(".")
    for i in range(len(parts) - 1):
        if parts[i] == "mlp" and parts[i + 1] == "experts":
            return True
    return False


def _draw_matrix(rows: int, cols: int, method: str) -> torch.Tensor:
    """A (rows, cols) = (fan_out, fan_in) float32 CPU matrix drawn from torch's global generator.

    The formulas (and the floating-point order of their terms) are those of
    torch.nn.init, so the same seed gives bit-identical matrices:
      xavier         Normal(0, sqrt(2 / (fan_in + fan_out)))
      xavier_uniform Uniform(-a, a), a = sqrt(3) * sqrt(2 / (fan_in + fan_out))
      kaiming        Uniform(-b, b), b = sqrt(3) * gain / sqrt(fan_in), gain = sqrt(2 / (1 + 5))  (a = sqrt 5)
      normal         Normal(0, 0.2)
      zero           zeros, draws nothing
    """
    if method not in _spec.INIT_METHODS:
        raise ValueError(f"unknown init method {method!r}; valid names are: {', '.join(_spec.INIT_METHODS)}")
    matrix = torch.zeros(rows, cols, dtype=torch.float32, device="cpu")
    if rows == 0 or cols == 0 or method == "zero":
        return matrix
    fan_out, fan_in = rows, cols
    if method == "xavier":
        std = 1.0 * math.sqrt(2.0 / float(fan_in + fan_out))
        matrix.normal_(0.0, std)
    elif method == "xavier_uniform":
        std = 1.0 * math.sqrt(2.0 / float(fan_in + fan_out))
        bound = math.sqrt(3.0) * std
        matrix.uniform_(-bound, bound)
    elif method == "kaiming":
        negative_slope = math.sqrt(5)
        gain = math.sqrt(2.0 / (1 + negative_slope**2))
        std = gain / math.sqrt(fan_in)
        bound = math.sqrt(3.0) * std
        matrix.uniform_(-bound, bound)
    elif method == "normal":
        matrix.normal_(0.0, _spec.NORMAL_INIT_STD)
    return matrix


def _group_size(group: Any) -> int:
    """World size of a process group; 1 for None or without an initialised torch.distributed."""
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def _tp_group_size(module: nn.Module) -> int:
    return _group_size(getattr(module, "tp_group", None))


def _grouped_tp_size(module: nn.Module) -> int:
    """How many ranks share a grouped linear's weights: the largest of its TP group sizes and `tp_size`.

    megatron's TEGroupedLinear with explicit expert communication hands TE
    `tp_group=None, tp_size=1` and keeps the real expert-TP group as
    `_tp_group`, so both attributes are consulted.
    """
    sizes = [_group_size(getattr(module, "tp_group", None)), _group_size(getattr(module, "_tp_group", None))]
    tp_size = getattr(module, "tp_size", None)
    if type(tp_size) is int:
        sizes.append(tp_size)
    return max(sizes)


def _split_sizes(m_splits: Any, num_experts: int, rows: int, where: str) -> list[int]:
    """m_splits (list of ints or 1-D tensor) as a list of ints, checked against the expert count and the rows of x."""
    if torch.is_tensor(m_splits):
        splits = [int(v) for v in m_splits.reshape(-1).tolist()]
    else:
        splits = [int(v) for v in m_splits]
    if len(splits) != num_experts:
        raise ValueError(f"{where}: m_splits has {len(splits)} entries for {num_experts} experts")
    if any(v < 0 for v in splits) or sum(splits) != rows:
        raise ValueError(f"{where}: m_splits {splits} must be non-negative and sum to the {rows} rows of x")
    return splits


def _find_topk(candidates: list[Any]) -> Optional[int]:
    """moe_router_topk from the first candidate whose `.config` has it (following `.module` wrappers)."""
    for obj in candidates:
        for _ in range(16):
            if obj is None:
                break
            config = getattr(obj, "config", None)
            topk = getattr(config, "moe_router_topk", None)
            if isinstance(topk, int) and not isinstance(topk, bool) and topk >= 1:
                return topk
            obj = getattr(obj, "module", None) if isinstance(obj, nn.Module) else None
    return None


def _as_dtype(value: Any) -> Optional[torch.dtype]:
    if value is None:
        return None
    dtype = value
    if isinstance(value, str):
        name = value[len("torch."):] if value.startswith("torch.") else value
        dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(
            f"lora_dtype={value!r} is invalid: it must be None (use the base weight's dtype) "
            "or a floating torch.dtype such as torch.bfloat16 (or its name, 'bfloat16')"
        )
    return dtype


def _as_pattern_list(field_name: str, value: Any) -> list[str]:
    if isinstance(value, str) or not isinstance(value, (list, tuple, set, frozenset)):
        raise ValueError(
            f"{field_name}={value!r} is invalid: it must be a list of names or patterns, e.g. {field_name}=[{value!r}]"
        )
    result = []
    for item in value:
        if not isinstance(item, str) or item == "":
            raise ValueError(f"{field_name} contains {item!r}; every entry must be a non-empty string")
        result.append(item)
    return result


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


# ======================================================================= adapter


class _Matrix(nn.Module):
    """A bias-free linear map held as one (out_features, in_features) `weight`."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, device: Any) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=dtype, device=device))
        self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, self.weight.T)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias=False"


class LoRAAdapter(nn.Module):
    """The adapter branch: (alpha / dim) * Dpost(B(A(Dpre(x)))) in the adapter's dtype.

    `linear_in` is A (in -> dim), `linear_out` is B (dim -> out), neither with
    a bias. A is drawn first, then B, from torch's global generator, over
    their full shapes in float32 on the CPU.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        dim: int,
        *,
        alpha: float,
        dropout: float = 0.0,
        dropout_position: str = "pre",
        lora_A_init_method: str = "xavier",
        lora_B_init_method: str = "zero",
        dtype: torch.dtype = torch.float32,
        device: Any = None,
    ) -> None:
        super().__init__()
        self.linear_in = _Matrix(in_features, dim, dtype, device)
        self.linear_out = _Matrix(dim, out_features, dtype, device)
        A = _draw_matrix(dim, in_features, lora_A_init_method)
        B = _draw_matrix(out_features, dim, lora_B_init_method)
        with torch.no_grad():
            self.linear_in.weight.copy_(A.to(dtype))
            self.linear_out.weight.copy_(B.to(dtype))
        self.dim = dim
        self.alpha = alpha
        self.dropout = dropout
        self.dropout_position = dropout_position

    @property
    def scale(self) -> float:
        return self.alpha / self.dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        A = self.linear_in.weight
        B = self.linear_out.weight
        h = x.to(A.dtype)
        if self.dropout_position == "pre" and self.training and self.dropout > 0:
            h = F.dropout(h, p=self.dropout, training=True)
        h = h @ A.T
        h = h @ B.T
        if self.dropout_position == "post" and self.training and self.dropout > 0:
            h = F.dropout(h, p=self.dropout, training=True)
        return h * self.scale

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, alpha={self.alpha}, dropout={self.dropout}, "
            f"dropout_position={self.dropout_position!r}"
        )


class LoRALinear(nn.Module):
    """A base linear (`to_wrap`) plus its `LoRAAdapter` (`adapter`): base(x) + adapter(x).

    A base returning `(output, bias, ...)` keeps that tuple, with the adapter
    added to `output`. Attributes the wrapper lacks are read from the base.
    """

    def __init__(self, to_wrap: nn.Module, adapter: LoRAAdapter) -> None:
        super().__init__()
        self.to_wrap = to_wrap
        self.adapter = adapter

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        base_out = self.to_wrap(x, *args, **kwargs)
        delta = self.adapter(x)
        if isinstance(base_out, tuple):
            out = base_out[0]
            return (out + delta.to(out.dtype),) + tuple(base_out[1:])
        return base_out + delta.to(base_out.dtype)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("_modules", {}).get("to_wrap")
            if base is None:
                raise
        if hasattr(base, name):
            return getattr(base, name)
        raise AttributeError(
            f"'{type(self).__name__}' object (wrapping {type(base).__name__}) has no attribute '{name}'"
        )


class _ExpertMatrices(nn.Module):
    """One bias-free (out_features, in_features) matrix per expert, held as `weight0` .. `weight{n-1}`."""

    def __init__(self, num_experts: int, in_features: int, out_features: int, dtype: torch.dtype, device: Any) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.in_features = in_features
        self.out_features = out_features
        for i in range(num_experts):
            self.register_parameter(
                f"weight{i}", nn.Parameter(torch.zeros(out_features, in_features, dtype=dtype, device=device))
            )

    def weights(self) -> list[torch.Tensor]:
        return [getattr(self, f"weight{i}") for i in range(self.num_experts)]

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, in_features={self.in_features}, out_features={self.out_features}, bias=False"


class LoRAExpertAdapters(nn.Module):
    """One adapter per expert of a grouped linear: rows of expert i get (alpha/dim) * Dpost(B_i(A_i(Dpre(x_i)))).

    `linear_in.weight{i}` is A_i (dim, in), `linear_out.weight{i}` is B_i
    (out, dim). Drawn from torch's global generator over full shapes in
    float32 on the CPU, in the order A0, B0, A1, B1, ...
    Dropout ("pre" on the whole input, "post" on the whole result) acts on
    all rows at once, before the split by expert / after the concatenation.
    """

    def __init__(
        self,
        num_experts: int,
        in_features: int,
        out_features: int,
        dim: int,
        *,
        alpha: float,
        dropout: float = 0.0,
        dropout_position: str = "pre",
        lora_A_init_method: str = "xavier",
        lora_B_init_method: str = "zero",
        dtype: torch.dtype = torch.float32,
        device: Any = None,
    ) -> None:
        super().__init__()
        self.linear_in = _ExpertMatrices(num_experts, in_features, dim, dtype, device)
        self.linear_out = _ExpertMatrices(num_experts, dim, out_features, dtype, device)
        for i in range(num_experts):
            A = _draw_matrix(dim, in_features, lora_A_init_method)
            B = _draw_matrix(out_features, dim, lora_B_init_method)
            with torch.no_grad():
                getattr(self.linear_in, f"weight{i}").copy_(A.to(dtype))
                getattr(self.linear_out, f"weight{i}").copy_(B.to(dtype))
        self.num_experts = num_experts
        self.dim = dim
        self.alpha = alpha
        self.dropout = dropout
        self.dropout_position = dropout_position

    @property
    def scale(self) -> float:
        return self.alpha / self.dim

    def forward(self, x: torch.Tensor, splits: list[int]) -> torch.Tensor:
        """x: (tokens, in) with rows grouped by expert; splits: tokens per expert (ints summing to tokens)."""
        As = self.linear_in.weights()
        Bs = self.linear_out.weights()
        h = x.to(As[0].dtype)
        if self.dropout_position == "pre" and self.training and self.dropout > 0:
            h = F.dropout(h, p=self.dropout, training=True)
        outs = []
        start = 0
        for i, count in enumerate(splits):
            block = h[start : start + count]
            outs.append((block @ As[i].T) @ Bs[i].T)
            start += count
        h = torch.cat(outs, dim=0)
        if self.dropout_position == "post" and self.training and self.dropout > 0:
            h = F.dropout(h, p=self.dropout, training=True)
        return h * self.scale

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_experts}, dim={self.dim}, alpha={self.alpha}, dropout={self.dropout}, "
            f"dropout_position={self.dropout_position!r}"
        )


class LoRAGroupedLinear(LoRALinear):
    """A grouped expert linear (`to_wrap`, called as `to_wrap(x, m_splits)`) plus its adapter(s).

    `adapter` is a `LoRAAdapter` shared by every expert (applied to all rows
    of x) or a `LoRAExpertAdapters` (expert i's adapter on expert i's rows).
    The base's `(output, bias)` tuple is kept, the adapter added to `output`.
    """

    def forward(self, x: torch.Tensor, m_splits: Any, *args: Any, **kwargs: Any) -> Any:
        base_out = self.to_wrap(x, m_splits, *args, **kwargs)
        if isinstance(self.adapter, LoRAExpertAdapters):
            splits = _split_sizes(m_splits, self.adapter.num_experts, x.shape[0], type(self).__name__)
            delta = self.adapter(x, splits)
        else:
            delta = self.adapter(x)
        if isinstance(base_out, tuple):
            out = base_out[0]
            return (out + delta.to(out.dtype),) + tuple(base_out[1:])
        return base_out + delta.to(base_out.dtype)


def _is_wrapper(module: Any) -> bool:
    return isinstance(module, LoRALinear)


# ========================================================================= LoRA


@dataclass
class LoRA:
    """Single-device LoRA with the SPEC fields; `LoRA(...)(model, training)` adapts, freezes and returns the model."""

    target_modules: list[str] = field(default_factory=lambda: list(_spec.DEFAULT_TARGET_MODULES))
    exclude_modules: list[str] = field(default_factory=list)
    dim: int = 32
    alpha: float = 32
    dropout: float = 0.0
    dropout_position: str = "pre"
    a2a_experimental: bool = False
    lora_A_init_method: str = "xavier"
    lora_B_init_method: str = "zero"
    lora_dtype: Optional[torch.dtype] = None
    normalize_moe_lora: bool = False
    share_expert_adapters: bool = True

    # ------------------------------------------------------------ validation
    def __post_init__(self) -> None:
        self.target_modules = _as_pattern_list("target_modules", self.target_modules)
        self.exclude_modules = _as_pattern_list("exclude_modules", self.exclude_modules)
        if self.target_modules and self.exclude_modules:
            raise ValueError(
                f"target_modules={self.target_modules!r} and exclude_modules={self.exclude_modules!r} are both "
                "non-empty; exclude mode needs target_modules empty: pass target_modules=[] together with "
                "exclude_modules (the default target_modules list is non-empty)"
            )
        if type(self.dim) is not int or self.dim < 1:
            raise ValueError(f"dim={self.dim!r} is invalid: the adapter rank must be an int >= 1")
        if type(self.alpha) not in (int, float) or not math.isfinite(self.alpha):
            raise ValueError(f"alpha={self.alpha!r} is invalid: it must be a finite number")
        if type(self.dropout) not in (int, float) or not (0.0 <= self.dropout < 1.0):
            raise ValueError(f"dropout={self.dropout!r} is invalid: it must be a number in [0, 1)")
        if self.dropout_position not in _spec.DROPOUT_POSITIONS:
            raise ValueError(f"dropout_position={self.dropout_position!r} is invalid: it must be 'pre' or 'post'")
        for name in ("lora_A_init_method", "lora_B_init_method"):
            value = getattr(self, name)
            if value not in _spec.INIT_METHODS:
                raise ValueError(f"unknown {name} {value!r}; valid names are: {', '.join(_spec.INIT_METHODS)}")
        self.lora_dtype = _as_dtype(self.lora_dtype)
        for name in ("a2a_experimental", "normalize_moe_lora", "share_expert_adapters"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: it must be True or False")
        self._used_patterns: set[str] = set()
        self._matched_something = False
        self._roots: list[nn.Module] = []

    # -------------------------------------------------------------- matching
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

    # ------------------------------------------------------------- transform
    def _base_shape(self, module: nn.Module, full_name: str) -> tuple[int, int, torch.Tensor]:
        """(in_features, out_features, weight) of a base the reference can adapt, else an error."""
        if isinstance(module, nn.Linear):
            return module.in_features, module.out_features, module.weight
        megatron_classes = _megatron_parallel_linear_classes()
        if megatron_classes and isinstance(module, megatron_classes):
            size = _tp_group_size(module)
            if size != 1:
                raise ValueError(
                    f"{full_name} ({type(module).__name__}) is sharded over a TP group of size {size}; "
                    "the reference LoRA is single-device: use lora.megatron for parallel layers"
                )
            weight = getattr(module, "weight", None)
            if weight is None:
                raise TypeError(
                    f"{full_name} ({type(module).__name__}) has no weight of its own "
                    "(skip_weight_param_allocation); the reference LoRA cannot adapt it"
                )
            return module.input_size, module.output_size, weight
        kind = type(module)
        raise TypeError(
            f"LoRA selected {full_name or '<root>'} of type {kind.__module__}.{kind.__qualname__}, "
            "which has no reference adapter: the reference adapts torch.nn.Linear, megatron-core "
            "ColumnParallelLinear/RowParallelLinear and grouped expert linears (num_gemms, weight0..) "
            "at TP size 1; narrow target_modules or use lora.megatron for Transformer Engine layers"
        )

    def _rank_for(self, module: nn.Module, full_name: str) -> int:
        if not self.normalize_moe_lora or not _is_expert_module(full_name):
            return self.dim
        topk = _find_topk([module] + list(self.__dict__.get("_roots", [])))
        if topk is None:
            raise ValueError(
                f"normalize_moe_lora=True but no moe_router_topk was found for expert linear "
                f"{full_name} (looked at the module's and the model's .config)"
            )
        if self.dim % topk != 0:
            raise ValueError(
                f"normalize_moe_lora=True needs dim divisible by moe_router_topk: dim={self.dim} is not "
                f"divisible by topk={topk} for {full_name}"
            )
        return self.dim // topk

    def _adapter_dtype(self, weight: torch.Tensor) -> torch.dtype:
        if self.lora_dtype is not None:
            return self.lora_dtype
        if weight.is_floating_point():
            return weight.dtype
        return torch.float32

    def _wrap_grouped(self, module: nn.Module, full_name: str) -> "LoRAGroupedLinear":
        """A grouped expert linear wrapped with one shared adapter or one adapter per expert."""
        size = _grouped_tp_size(module)
        if size != 1:
            raise ValueError(
                f"{full_name} ({type(module).__name__}) is a grouped expert linear sharded over a TP group "
                f"of size {size}; the reference LoRA is single-device: use lora.megatron for parallel layers"
            )
        weights = _grouped_weights(module)
        assert weights is not None
        out_features, in_features = weights[0].shape
        for i, w in enumerate(weights):
            if tuple(w.shape) != (out_features, in_features):
                raise TypeError(
                    f"{full_name} ({type(module).__name__}): weight{i} has shape {tuple(w.shape)}, "
                    f"weight0 has {(out_features, in_features)}; the reference needs equal expert shapes"
                )
        common = dict(
            alpha=self.alpha,
            dropout=self.dropout,
            dropout_position=self.dropout_position,
            lora_A_init_method=self.lora_A_init_method,
            lora_B_init_method=self.lora_B_init_method,
            dtype=self._adapter_dtype(weights[0]),
            device=weights[0].device,
        )
        rank = self._rank_for(module, full_name)
        if self.share_expert_adapters:
            adapter: nn.Module = LoRAAdapter(in_features, out_features, rank, **common)
        else:
            adapter = LoRAExpertAdapters(len(weights), in_features, out_features, rank, **common)
        return LoRAGroupedLinear(module, adapter)

    def transform(self, module: nn.Module, name: Optional[str] = None, prefix: Optional[str] = None) -> nn.Module:
        """`module` wrapped in a LoRALinear (LoRAGroupedLinear for a grouped expert linear) when selected; else itself."""
        name = name or ""
        prefix = prefix or ""
        full_name = f"{prefix}.{name}" if prefix else name
        if _is_wrapper(module):
            return module
        if "_used_patterns" not in self.__dict__:
            self._used_patterns = set()
            self._matched_something = False
        if not self._selected(module, full_name):
            return module
        if _is_grouped_linear(module):
            return self._wrap_grouped(module, full_name)
        in_features, out_features, weight = self._base_shape(module, full_name)
        dtype = self._adapter_dtype(weight)
        adapter = LoRAAdapter(
            in_features,
            out_features,
            self._rank_for(module, full_name),
            alpha=self.alpha,
            dropout=self.dropout,
            dropout_position=self.dropout_position,
            lora_A_init_method=self.lora_A_init_method,
            lora_B_init_method=self.lora_B_init_method,
            dtype=dtype,
            device=weight.device,
        )
        return LoRALinear(module, adapter)

    # ---------------------------------------------------------------- freeze
    def freeze_model(self, model: Any, training: bool = True) -> None:
        """requires_grad=False on every parameter (adapters included); train mode when `training`."""
        for chunk in _model_chunks(model):
            for param in chunk.parameters():
                param.requires_grad = False
            if training:
                chunk.train(True)

    # ------------------------------------------------------------------ call
    def _adapt_chunk(self, chunk: nn.Module) -> nn.Module:
        """Pre-order walk over `chunk.named_modules()`, wrapping what `transform` selects."""
        visited = list(chunk.named_modules())
        replacements: dict[int, nn.Module] = {}
        skip_under: list[str] = []  # names of wrappers: their insides are not walked
        for full_name, module in visited:
            if _is_inside(full_name, skip_under):
                continue
            if _is_wrapper(module):
                # Applied before: leave it alone, but count its base as matched
                # so that a second call warns about nothing.
                self._selected(module.to_wrap, full_name)
                skip_under.append(full_name)
                continue
            prefix, _, name = full_name.rpartition(".")
            new = self.transform(module, name, prefix)
            if new is not module:
                replacements[id(module)] = new
                skip_under.append(full_name)
        _replace_children([m for _, m in visited], replacements)
        return replacements.get(id(chunk), chunk)

    def __call__(self, model: Any, training: bool = True) -> Any:
        chunks = _model_chunks(model)
        self._used_patterns = set()
        self._matched_something = False
        self._roots = chunks
        try:
            self.freeze_model(model, training)
            adapted = [self._adapt_chunk(chunk) for chunk in chunks]
        finally:
            self._roots = []
        result = _same_container(model, adapted)
        if training:
            for chunk in adapted:
                for module in chunk.modules():
                    if _is_wrapper(module):
                        for param in module.adapter.parameters():
                            param.requires_grad = True
        else:
            # Inference, as in Megatron-Bridge: freeze again, adapters included.
            self.freeze_model(result, training=False)
        for chunk in adapted:
            chunk.train(training)
        self._warn_about_unused_patterns()
        return result


# ========================================================================== VLM


@dataclass
class VLMLoRA(LoRA):
    """LoRA for a vision-language model: freezes only the subtrees whose flag is set.

    With training=True the adapters end trainable everywhere and an unflagged
    subtree stays fully trainable (adapters on top). With training=False the
    freeze runs again after the transform, so adapters inside flagged
    subtrees end frozen; unflagged subtrees keep their flags.
    """

    freeze_vision_model: bool = True
    freeze_vision_projection: bool = True
    freeze_language_model: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in _spec.VLM_FIELD_DEFAULTS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: it must be True or False")

    def freeze_model(self, model: Any, training: bool = True) -> None:
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
        flags = {
            "vision_model": self.freeze_vision_model,
            "vision_projection": self.freeze_vision_projection,
            "language_model": self.freeze_language_model,
        }
        for part in _spec.VLM_PARTS:
            subtree = getattr(inner, part, None)
            if flags[part] and subtree is not None:
                for param in subtree.parameters():
                    param.requires_grad = False
        if training:
            for chunk in chunks:
                chunk.train(True)


# ======================================================================== merge


@dataclass
class LoRAMerge:
    """Folds adapters into base weights on one device.

    `merge(...)` is the weight formula; calling the object on a model (or
    `merge_lora(model)`) replaces every adapter wrapper by its base layer,
    whose weight now holds base + (alpha/dim) * B @ A (a grouped expert
    linear: each `weight{i}` gets B_i @ A_i, or the shared B @ A), so the returned model's
    forward equals the adapted forward in eval mode (dropout off). Base
    weights are updated in place: the returned model shares its layers with
    the input.
    """

    def merge(
        self,
        base_weight: torch.Tensor,
        linear_out: torch.Tensor,
        linear_in: torch.Tensor,
        alpha: float,
        dim: int,
        *,
        tp_size: int = 1,
        tp_group: Any = None,
    ) -> torch.Tensor:
        """base_weight + (alpha/dim) * linear_out @ linear_in, in float32 (float64 for a float64 base), cast once."""
        if tp_size != 1:
            raise ValueError(
                f"LoRAMerge.merge got tp_size={tp_size}; the reference merge is single-device "
                "(tp_size=1): use lora.megatron's LoRAMerge for sharded weights"
            )
        if base_weight.dim() != 2 or linear_out.dim() != 2 or linear_in.dim() != 2:
            raise ValueError(
                f"LoRAMerge.merge needs 2-D tensors, got base {tuple(base_weight.shape)}, "
                f"linear_out {tuple(linear_out.shape)}, linear_in {tuple(linear_in.shape)}"
            )
        out_features, in_features = base_weight.shape
        if linear_out.shape[1] != linear_in.shape[0] or linear_out.shape[0] != out_features or linear_in.shape[1] != in_features:
            raise ValueError(
                f"LoRAMerge.merge: base {tuple(base_weight.shape)} does not equal linear_out "
                f"{tuple(linear_out.shape)} @ linear_in {tuple(linear_in.shape)} in shape"
            )
        compute = torch.float64 if base_weight.dtype == torch.float64 else torch.float32
        B = linear_out.to(device=base_weight.device, dtype=compute)
        A = linear_in.to(device=base_weight.device, dtype=compute)
        merged = base_weight.to(compute) + (alpha / dim) * (B @ A)
        return merged.to(base_weight.dtype)

    @torch.no_grad()
    def transform(self, module: nn.Module, name: Optional[str] = None, prefix: Optional[str] = None) -> nn.Module:
        """The base layer with the adapter folded in, for an adapter wrapper; anything else unchanged."""
        if not (hasattr(module, "to_wrap") and hasattr(module, "adapter")):
            return module
        base = module.to_wrap
        adapter = module.adapter
        grouped = _grouped_weights(base)
        if grouped is not None:
            tp_size = _grouped_tp_size(base)
            for i, weight in enumerate(grouped):
                if isinstance(adapter, LoRAExpertAdapters):
                    B = getattr(adapter.linear_out, f"weight{i}")
                    A = getattr(adapter.linear_in, f"weight{i}")
                else:
                    B = adapter.linear_out.weight
                    A = adapter.linear_in.weight
                weight.copy_(self.merge(weight, B, A, adapter.alpha, adapter.dim, tp_size=tp_size))
            return base
        merged = self.merge(
            base.weight,
            adapter.linear_out.weight,
            adapter.linear_in.weight,
            adapter.alpha,
            adapter.dim,
            tp_size=_tp_group_size(base),
        )
        base.weight.copy_(merged)
        return base

    def __call__(self, model: Any) -> Any:
        merged_chunks = []
        for chunk in _model_chunks(model):
            visited = list(chunk.named_modules())
            replacements: dict[int, nn.Module] = {}
            skip_under: list[str] = []
            for full_name, module in visited:
                if _is_inside(full_name, skip_under):
                    continue
                prefix, _, name = full_name.rpartition(".")
                new = self.transform(module, name, prefix)
                if new is not module:
                    replacements[id(module)] = new
                    skip_under.append(full_name)
            _replace_children([m for _, m in visited], replacements)
            merged_chunks.append(replacements.get(id(chunk), chunk))
        return _same_container(model, merged_chunks)


def merge_lora(model: Any) -> Any:
    """Fold every adapter of a reference-LoRA model into its base weight; returns plain base layers."""
    return LoRAMerge()(model)
