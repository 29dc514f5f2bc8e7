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

__all__ = ["CaseError", "GPTCase", "MoECase", "VLMCase", "case_from_json", "dtype_name", "parse_dtype", "CASE_TYPES"]

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


def case_from_json(data: Mapping[str, Any]) -> Any:
    """The case a ``to_json`` dict describes, for any registered family."""
    family = data.get("family")
    if family not in CASE_TYPES:
        raise ValueError(f"case family {family!r} is not one of {', '.join(CASE_TYPES)}")
    return CASE_TYPES[family].from_json(data)
