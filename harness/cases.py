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

__all__ = ["GPTCase", "case_from_json", "dtype_name", "parse_dtype", "CASE_TYPES"]

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

    def __post_init__(self) -> None:
        if not isinstance(self.layout, ParallelLayout):
            raise TypeError(f"GPTCase.layout must be a ParallelLayout, got {self.layout!r}")
        if not isinstance(self.model_dtype, torch.dtype):
            raise TypeError(f"GPTCase.model_dtype must be a torch.dtype, got {self.model_dtype!r}")
        if "lora_dtype" in self.lora:
            raise ValueError("GPTCase.lora must not hold lora_dtype: pass it as the typed field lora_dtype")

    def with_(self, **changes: Any) -> "GPTCase":
        return replace(self, **changes)

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
        )

    def describe(self) -> str:
        """One line for progress and reports."""
        targets = self.lora.get("target_modules") or f"all but {self.lora.get('exclude_modules')}"
        return (
            f"{self.family} {self.layout} L{self.shape.num_layers} h{self.shape.hidden_size} "
            f"dim {self.lora.get('dim')} {targets} {dtype_name(self.model_dtype)}"
            f"{'' if self.training else ' eval'} seed {self.seed}"
        )


CASE_TYPES: dict[str, type] = {"gpt": GPTCase}


def case_from_json(data: Mapping[str, Any]) -> Any:
    """The case a ``to_json`` dict describes, for any registered family."""
    family = data.get("family")
    if family not in CASE_TYPES:
        raise ValueError(f"case family {family!r} is not one of {', '.join(CASE_TYPES)}")
    return CASE_TYPES[family].from_json(data)
