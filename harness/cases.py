"""Typed cases: one drawn example per model family, with layout and dtypes carried as values.

A case is everything a rank needs to rebuild the same example: the model
shape, the LoRA keyword arguments, the seed, the layout, the dtypes, the
implementation and the contract it is judged by. Cases round-trip through
plain JSON (``to_json`` / ``case_from_json``), which is how failing examples
are stored under a regressions directory and replayed on every later run.

Families register here (``FAMILIES``); the GPT family is the dense
megatron-core ``GPTModel``. MoE and VLM families add their own case types.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Mapping, Optional

import torch

from harness.layouts import ParallelLayout
from harness.models import GPTShape

__all__ = ["CaseError", "GPTCase", "MoECase", "VLMCase", "case_from_json", "check_case_json", "dtype_name", "parse_dtype", "CASE_TYPES", "CASE_FIELDS"]

_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def dtype_name(dtype: Optional[torch.dtype]) -> Optional[str]:
    """``torch.float32`` -> ``"float32"``; None stays None."""
    if dtype is None:
        return None
    return str(dtype).replace("torch.", "")


def parse_dtype(value: Any) -> Optional[torch.dtype]:
    """A dtype value from a name (``"float32"``, ``"torch.float32"``), a dtype, or None."""
    if value is None or isinstance(value, torch.dtype):
        return value
    name = str(value).replace("torch.", "")
    if name not in _DTYPES:
        raise ValueError(f"dtype {value!r} is not one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


class CaseError(ValueError):
    """A case no layout can run (bad shape for its layout, bad MoE settings): raised in the parent."""


@dataclass(frozen=True)
class GPTCase:
    """One dense-GPT example.

    ``lora`` holds the LoRA keyword arguments except ``lora_dtype``, which
    is the typed field ``lora_dtype``. ``contract`` is the contract the
    implementation declared (``harness.contract.CONTRACTS``).
    """

    family: ClassVar[str] = "gpt"

    shape: GPTShape
    lora: Mapping[str, Any]
    seed: int
    layout: ParallelLayout = field(default_factory=ParallelLayout)
    impl: str = "lora.megatron"
    training: bool = True
    model_dtype: torch.dtype = torch.float32
    lora_dtype: Optional[torch.dtype] = None
    contract: str = "strict"
    #: Forward/backward passes before gradients are compared (they must accumulate).
    micro_batches: int = 1
    #: (model grid, adapter grid): dtype names every seeded value is rounded to
    #: before the run, so a float64 run computes on a 16-bit run's exact weights.
    value_grid: Optional[tuple[str, str]] = None

    def __post_init__(self) -> None:
        if not isinstance(self.layout, ParallelLayout):
            raise TypeError(f"GPTCase.layout must be a ParallelLayout, got {self.layout!r}")
        if not isinstance(self.model_dtype, torch.dtype):
            raise TypeError(f"GPTCase.model_dtype must be a torch.dtype, got {self.model_dtype!r}")
        if "lora_dtype" in self.lora:
            raise ValueError("GPTCase.lora must not hold lora_dtype: pass it as the typed field lora_dtype")
        if isinstance(self.micro_batches, bool) or not isinstance(self.micro_batches, int) or self.micro_batches < 1:
            raise ValueError(f"GPTCase.micro_batches={self.micro_batches!r}: must be an integer >= 1")
        if self.value_grid is not None:
            grid = tuple(self.value_grid)
            if len(grid) != 2:
                raise ValueError(f"GPTCase.value_grid={self.value_grid!r}: must be (model dtype, adapter dtype)")
            for name in grid:
                parse_dtype(name)
            object.__setattr__(self, "value_grid", tuple(dtype_name(parse_dtype(n)) for n in grid))

    def with_(self, **changes: Any) -> "GPTCase":
        return replace(self, **changes)

    def validate(self, world_size: Optional[int] = None) -> None:
        """Raise ``CaseError`` (in the parent, before any rank works) naming the field, value and rule
        when the case's model cannot be laid out at its layout (in ``world_size`` ranks, when given)."""
        from harness.layouts import LayoutError
        from harness.models import ShapeError

        problem = _shape_problem(type(self.shape), dataclasses.asdict(self.shape), "shape") if dataclasses.is_dataclass(self.shape) else None
        if problem:
            raise CaseError(f"{self.family} case at layout {self.layout}: {problem}")
        try:
            if world_size is not None and not self.layout.fits(world_size):
                self.layout._require_fit(world_size)
            self._check_shape()
        except (ShapeError, LayoutError) as exc:
            raise CaseError(f"{self.family} case at layout {self.layout}: {exc}") from None

    def _check_shape(self) -> None:
        self.shape.check(self.layout.tp)

    def lora_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``impl.LoRA(...)``."""
        kwargs = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in self.lora.items()}
        kwargs["lora_dtype"] = self.lora_dtype
        return kwargs

    @property
    def world_size(self) -> int:
        return self.layout.min_world_size

    def reference_key(self) -> tuple:
        """Identity of the layout-independent part: what the world-size-1 runs depend on."""
        return (
            self.family,
            self.shape,
            tuple(sorted((k, repr(v)) for k, v in self.lora.items())),
            self.seed,
            self.training,
            self.model_dtype,
            self.lora_dtype,
            self.micro_batches,
            self.value_grid,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "shape": dataclasses.asdict(self.shape),
            "lora": {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in self.lora.items()},
            "seed": self.seed,
            "layout": self.layout.describe(),
            "impl": self.impl,
            "training": self.training,
            "model_dtype": dtype_name(self.model_dtype),
            "lora_dtype": dtype_name(self.lora_dtype),
            "contract": self.contract,
            "micro_batches": self.micro_batches,
            "value_grid": None if self.value_grid is None else list(self.value_grid),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "GPTCase":
        return cls(
            shape=GPTShape(**data["shape"]),
            lora=dict(data["lora"]),
            seed=int(data["seed"]),
            layout=ParallelLayout.parse(data["layout"]),
            impl=data.get("impl", "lora.megatron"),
            training=bool(data.get("training", True)),
            model_dtype=parse_dtype(data.get("model_dtype", "float32")),
            lora_dtype=parse_dtype(data.get("lora_dtype")),
            contract=data.get("contract", "strict"),
            micro_batches=int(data.get("micro_batches", 1)),
            value_grid=None if data.get("value_grid") is None else tuple(data["value_grid"]),
        )

    def describe(self) -> str:
        """One line for progress and reports."""
        targets = self.lora.get("target_modules") or f"all but {self.lora.get('exclude_modules')}"
        return (
            f"{self.family} {self.layout} L{self.shape.num_layers} h{self.shape.hidden_size} "
            f"dim {self.lora.get('dim')} {targets} {dtype_name(self.model_dtype)}"
            f"{'' if self.lora_dtype is None else ' lora ' + dtype_name(self.lora_dtype)}"
            f"{' dropout ' + str(self.lora.get('dropout')) if self.lora.get('dropout') else ''}"
            f"{'' if self.micro_batches == 1 else f' {self.micro_batches} micro-batches'}"
            f"{'' if self.training else ' eval'} seed {self.seed}"
        )


@dataclass(frozen=True)
class MoECase(GPTCase):
    """One mixture-of-experts GPT example: a ``harness.moe.MoEShape`` (experts, top-k,
    expert widths, shared experts, token dispatcher, grouped or sequential experts).

    The layout's ETP and EP split the experts; ``lora`` may carry
    ``share_expert_adapters`` and ``normalize_moe_lora``.
    """

    family: ClassVar[str] = "moe"

    def __post_init__(self) -> None:
        super().__post_init__()
        from harness.moe import MoEShape

        if not isinstance(self.shape, MoEShape):
            raise TypeError(f"MoECase.shape must be a harness.moe.MoEShape, got {type(self.shape).__name__}")

    def _check_shape(self) -> None:
        layout, lora = self.layout, self.lora
        self.shape.check(layout.tp, layout.ep, layout.etp_size)
        if not layout.moe_trainable:
            raise CaseError(
                f"moe case at layout {layout}: TP={layout.tp} without sequence parallelism; megatron-core's "
                "MoELayer requires sequence_parallel=True for MoE at TP > 1 (use a layout with -sp)"
            )
        topk = self.shape.moe_router_topk
        dim = lora.get("dim", 32)
        if lora.get("normalize_moe_lora") and dim % topk:
            raise CaseError(
                f"moe case: normalize_moe_lora=True needs dim divisible by moe_router_topk, "
                f"but dim={dim} and moe_router_topk={topk}"
            )

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "MoECase":
        from harness.moe import MoEShape

        base = GPTCase.from_json({**data, "shape": {}})
        return cls(**{f.name: getattr(base, f.name) for f in dataclasses.fields(GPTCase)} | {"shape": MoEShape(**data["shape"])})

    def describe(self) -> str:
        s = self.shape
        experts = f"{s.num_experts}x top{s.moe_router_topk} {'grouped' if s.grouped else 'sequential'} {s.dispatcher}"
        if s.shared_expert_ffn_hidden_size:
            experts += " +shared"
        flags = "".join(
            f" {k}" for k in ("share_expert_adapters", "normalize_moe_lora") if self.lora.get(k)
        )
        return super().describe().replace(f"L{s.num_layers} ", f"L{s.num_layers} {experts}{flags} ", 1)


@dataclass(frozen=True)
class VLMCase(GPTCase):
    """One vision-language example: a ``harness.vlm.VLMShape`` (megatron-core's LLaVAModel).

    The task loops over all 16 combinations of VLMLoRA's three freeze flags
    and ``training`` itself, so ``training`` is not a drawn value here;
    ``lora`` holds the LoRA fields VLMLoRA shares with LoRA (patterns
    reaching into the vision tower and the projection, dim, alpha, init).
    """

    family: ClassVar[str] = "vlm"

    def __post_init__(self) -> None:
        super().__post_init__()
        from harness.vlm import VLMShape

        if not isinstance(self.shape, VLMShape):
            raise TypeError(f"VLMCase.shape must be a harness.vlm.VLMShape, got {type(self.shape).__name__}")

    def _check_shape(self) -> None:
        if self.layout.sp:
            raise CaseError(
                f"vlm case at layout {self.layout}: megatron-core's LLaVAModel supports sequence parallelism only "
                "with Transformer Engine's attention (an assert in its constructor); use a layout without -sp"
            )
        self.shape.check(self.layout.tp)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "VLMCase":
        from harness.vlm import VLMShape

        base = GPTCase.from_json({**data, "shape": {}})
        return cls(**{f.name: getattr(base, f.name) for f in dataclasses.fields(GPTCase)} | {"shape": VLMShape(**data["shape"])})

    def describe(self) -> str:
        s = self.shape
        vision = f"vision h{s.vision_hidden_size} img{s.img_size}/p{s.patch_dim} proj{s.projection_ffn_hidden_size} "
        return super().describe().replace(f"L{s.num_layers} ", f"L{s.num_layers} {vision}", 1)


CASE_TYPES: dict[str, type] = {"gpt": GPTCase, "moe": MoECase, "vlm": VLMCase}


#: Top-level fields of a case's JSON (``to_json``); the first five are required.
CASE_FIELDS = ("family", "shape", "lora", "seed", "layout", "impl", "training", "model_dtype", "lora_dtype",
               "contract", "micro_batches", "value_grid")
_REQUIRED_FIELDS = CASE_FIELDS[:5]
#: Seeds are 0 <= seed < 2**32 (what hypothesis draws is far below; torch and megatron accept these).
_SEED_LIMIT = 2**32


def _shape_class(family: str) -> type:
    if family == "moe":
        from harness.moe import MoEShape

        return MoEShape
    if family == "vlm":
        from harness.vlm import VLMShape

        return VLMShape
    return GPTShape


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    import math

    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _shape_problem(cls: type, shape: Mapping[str, Any], where: str) -> Optional[str]:
    """The first field of a shape dict that is unknown or of the wrong type or size, as a message; or None."""
    kinds = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    unknown = [k for k in shape if k not in kinds]
    if unknown:
        return f"case field {where}.{unknown[0]!s}: not a field of {cls.__name__} (fields: {', '.join(kinds)})"
    for name, value in shape.items():
        kind = kinds[name]
        field_name = f"case field {where}.{name} = {value!r}"
        if kind == "bool":
            if not isinstance(value, bool):
                return f"{field_name}: must be true or false"
        elif kind == "str":
            if not isinstance(value, str):
                return f"{field_name}: must be a string"
        elif kind in ("int", "Optional[int]"):
            if value is None and kind == "Optional[int]":
                continue
            if not _is_int(value) or value < 1:
                optional = " (or null)" if kind == "Optional[int]" else ""
                return f"{field_name}: must be an integer >= 1{optional} (a size)"
    return None


def _lora_problem(lora: Mapping[str, Any]) -> Optional[str]:
    from harness.contract import DROPOUT_POSITIONS, INIT_METHODS, LORA_FIELDS

    for name, value in lora.items():
        field_name = f"case field lora.{name} = {value!r}"
        if name == "lora_dtype":
            return f"{field_name}: lora_dtype is the case's own field 'lora_dtype', not a LoRA keyword here"
        if name not in LORA_FIELDS:
            return f"case field lora.{name}: not a LoRA field (fields: {', '.join(k for k in LORA_FIELDS if k != 'lora_dtype')})"
        if name in ("target_modules", "exclude_modules"):
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                return f"{field_name}: must be a list of module name patterns (strings)"
        elif name == "dim":
            if not _is_int(value) or value < 1:
                return f"{field_name}: must be an integer >= 1"
        elif name == "alpha":
            if not _is_number(value):
                return f"{field_name}: must be a finite number"
        elif name == "dropout":
            if not _is_number(value) or not 0 <= value < 1:
                return f"{field_name}: must be a number from 0 up to (not including) 1"
        elif name == "dropout_position":
            if value not in DROPOUT_POSITIONS:
                return f"{field_name}: must be one of {', '.join(DROPOUT_POSITIONS)}"
        elif name in ("lora_A_init_method", "lora_B_init_method"):
            if not isinstance(value, str) or value not in INIT_METHODS:
                return f"{field_name}: must be one of {', '.join(INIT_METHODS)}"
        elif isinstance(LORA_FIELDS[name], bool):
            if not isinstance(value, bool):
                return f"{field_name}: must be true or false"
    return None


def _dtype_problem(name: str, value: Any, optional: bool) -> Optional[str]:
    if value is None and optional:
        return None
    if not isinstance(value, str) or value.replace("torch.", "") not in _DTYPES:
        return f"case field {name} = {value!r}: must be one of {', '.join(_DTYPES)}" + (" or null" if optional else "")
    return None


def check_case_json(data: Any) -> None:
    """Raise ``ValueError`` naming the first missing or bad field of a case's JSON (``to_json``'s form)."""
    from harness.contract import CONTRACTS

    if not isinstance(data, Mapping):
        kind = "a list" if isinstance(data, list) else f"a {type(data).__name__}"
        raise ValueError(f"a case must be a JSON object with fields {', '.join(_REQUIRED_FIELDS)}, ..., not {kind}")
    missing = [k for k in _REQUIRED_FIELDS if k not in data]
    if missing:
        raise ValueError(f"case field {missing[0]!r} is missing (a case needs {', '.join(_REQUIRED_FIELDS)})")
    unknown = [k for k in data if k not in CASE_FIELDS]
    if unknown:
        raise ValueError(f"case field {unknown[0]!r}: not a case field (fields: {', '.join(CASE_FIELDS)})")
    family = data["family"]
    if not isinstance(family, str) or family not in CASE_TYPES:
        raise ValueError(f"case field family = {family!r}: must be one of {', '.join(CASE_TYPES)}")
    problems = []
    if not isinstance(data["shape"], Mapping):
        problems.append(f"case field shape = {data['shape']!r}: must be an object of {_shape_class(family).__name__} fields")
    else:
        problems.append(_shape_problem(_shape_class(family), data["shape"], "shape"))
    if not isinstance(data["lora"], Mapping):
        problems.append(f"case field lora = {data['lora']!r}: must be an object of LoRA keyword arguments")
    else:
        problems.append(_lora_problem(data["lora"]))
    seed = data["seed"]
    if not _is_int(seed) or not 0 <= seed < _SEED_LIMIT:
        problems.append(f"case field seed = {seed!r}: must be an integer from 0 to {_SEED_LIMIT - 1}")
    layout = data["layout"]
    if not isinstance(layout, str):
        problems.append(f"case field layout = {layout!r}: must be a layout name such as 'tp2-ep1-etp2-pp1'")
    else:
        try:
            ParallelLayout.parse(layout)
        except ValueError as exc:
            problems.append(f"case field layout: {exc}")
    impl = data.get("impl", "lora.megatron")
    if not isinstance(impl, str) or not impl.strip():
        problems.append(f"case field impl = {impl!r}: must be a module name such as 'lora.megatron'")
    if not isinstance(data.get("training", True), bool):
        problems.append(f"case field training = {data['training']!r}: must be true or false")
    problems.append(_dtype_problem("model_dtype", data.get("model_dtype", "float32"), optional=False))
    problems.append(_dtype_problem("lora_dtype", data.get("lora_dtype"), optional=True))
    contract = data.get("contract", "strict")
    if not isinstance(contract, str) or contract not in CONTRACTS:
        problems.append(f"case field contract = {contract!r}: must be one of {', '.join(CONTRACTS)}")
    micro = data.get("micro_batches", 1)
    if not _is_int(micro) or micro < 1:
        problems.append(f"case field micro_batches = {micro!r}: must be an integer >= 1")
    grid = data.get("value_grid")
    if grid is not None:
        if not isinstance(grid, (list, tuple)) or len(grid) != 2:
            problems.append(f"case field value_grid = {grid!r}: must be null or [model dtype, adapter dtype]")
        else:
            problems += [_dtype_problem(f"value_grid[{i}]", g, optional=False) for i, g in enumerate(grid)]
    problems = [p for p in problems if p]
    if problems:
        raise ValueError(problems[0])


def case_from_json(data: Mapping[str, Any]) -> Any:
    """The case a ``to_json`` dict describes, for any registered family.

    Raises ``ValueError`` naming the first missing or bad field (its value
    and the rule) before anything is built; the result still has to fit its
    layout (``validate()``).
    """
    check_case_json(data)
    try:
        return CASE_TYPES[data["family"]].from_json(data)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"case: {exc}") from None
