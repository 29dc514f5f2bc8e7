"""The dense family's case: one megatron-core GPTModel example (the base of every family's case)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Mapping, Optional

import torch

from harness.cases import CaseError, dtype_name, parse_dtype, shape_problem
from harness.layouts import ParallelLayout
from harness.families.gpt.model import GPTShape
from harness.training import TrainingLoop

__all__ = ["GPTCase"]


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
    #: How the training properties train this example (``harness.training``); None: not drawn.
    loop: Optional[TrainingLoop] = None
    #: Where the checkpoint property loads what it saved at ``layout`` (``harness.checkpoint``); None: not drawn.
    load_layout: Optional[ParallelLayout] = None

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
        if self.loop is not None and not isinstance(self.loop, TrainingLoop):
            raise TypeError(f"GPTCase.loop must be a harness.training.TrainingLoop or None, got {self.loop!r}")
        if self.load_layout is not None and not isinstance(self.load_layout, ParallelLayout):
            raise TypeError(f"GPTCase.load_layout must be a ParallelLayout or None, got {self.load_layout!r}")

    def with_(self, **changes: Any) -> "GPTCase":
        return replace(self, **changes)

    def validate(self, world_size: Optional[int] = None) -> None:
        """Raise ``CaseError`` (in the parent, before any rank works) naming the field, value and rule
        when the case's model cannot be laid out at its layout (in ``world_size`` ranks, when given)."""
        from harness.layouts import LayoutError
        from harness.families.gpt.model import ShapeError

        problem = shape_problem(type(self.shape), dataclasses.asdict(self.shape), "shape") if dataclasses.is_dataclass(self.shape) else None
        if problem:
            raise CaseError(f"{self.family} case at layout {self.layout}: {problem}")
        try:
            if world_size is not None and not self.layout.fits(world_size):
                self.layout._require_fit(world_size)
            self._check_shape()
        except (ShapeError, LayoutError) as exc:
            raise CaseError(f"{self.family} case at layout {self.layout}: {exc}") from None
        seq = getattr(self.shape, "seq_length", None)
        if self.layout.sp and self.layout.tp > 1 and isinstance(seq, int) and seq % self.layout.tp:
            raise CaseError(f"{self.family} case at layout {self.layout}: {type(self.shape).__name__}.seq_length={seq} "
                            f"must be divisible by TP={self.layout.tp} under sequence parallelism (each rank holds "
                            "an equal sequence shard)")
        layers = getattr(self.shape, "num_layers", None)
        stages = self.layout.stages
        if stages > 1 and isinstance(layers, int) and layers % stages:
            raise CaseError(f"{self.family} case at layout {self.layout}: {type(self.shape).__name__}.num_layers={layers} "
                            f"must be divisible by pp*vpp={self.layout.pp}*{self.layout.chunks}={stages} (megatron gives "
                            "every pipeline stage and virtual chunk the same number of layers)")
        if self.layout.pp > 1 and self.family not in ("gpt", "moe", "vlm"):
            raise CaseError(f"{self.family} case at layout {self.layout}: pipeline layouts (pp={self.layout.pp}) are "
                            "run for the built-in families (gpt, moe, vlm) only so far")
        if self.loop is not None:
            from harness.training import layout_problem

            problem = layout_problem(self.loop, self.layout, self.family)
            if problem:
                raise CaseError(f"{self.family} case: {problem}")
        if self.load_layout is not None:
            # The model must fit the layout it is loaded at as well (the same rules, at that layout).
            try:
                self.with_(layout=self.load_layout, load_layout=None, loop=None).validate()
            except CaseError as exc:
                raise CaseError(f"{self.family} case: load_layout {self.load_layout}: {exc}") from None

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
        out = {
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
        if self.loop is not None:
            out["loop"] = self.loop.to_json()
        if self.load_layout is not None:
            out["load_layout"] = self.load_layout.describe()
        return out

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
            loop=None if data.get("loop") is None else TrainingLoop.from_json(data["loop"]),
            load_layout=None if data.get("load_layout") is None else ParallelLayout.parse(data["load_layout"]),
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
