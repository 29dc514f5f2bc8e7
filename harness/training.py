"""The training loop the training properties run (harness/SPEC.md, "Training loop").

A ``TrainingLoop`` is the part of a case that says how the adapted model is
trained under megatron-core's own machinery: ``steps`` optimizer steps of
``micro_batches`` micro-batches each, megatron-core's
``DistributedDataParallel`` (``overlap_grad_reduce``, ``grad_reduce_in_fp32``,
``bucket_size``) with ``finalize_model_grads``, megatron-core's optimizer
(``get_megatron_optimizer``: Adam or SGD with momentum, the distributed
optimizer on or off), activation recompute (``RECOMPUTE``), bf16 parameters
(SGD) and the loss normalisation (per micro-batch, or megatron's per-token
loss). Every data-parallel replica gets its own data and loss masks. The reference trains on the same
global batch on one device with plain torch (``harness.tasks.training``).

It is drawn with every example (``training_loops``), shrinks with it and
travels in its JSON (``"loop"``). ``problem`` names what megatron-core or the
harness cannot run, in the parent, before any rank starts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Optional

__all__ = ["TrainingLoop", "RECOMPUTE", "OPTIMIZERS", "LR", "ADAM_EPS", "SGD_MOMENTUM", "MAX_STEPS",
           "MAX_MICRO_BATCHES", "BUCKET_SIZES", "recompute_overrides", "loop_overrides", "training_loops", "loop_problem", "layout_problem",
           "data_parallel_size", "training_case", "reference_training_case", "exact_training_case", "row_valid", "FLOAT64_ONLY"]

#: Recompute settings by name -> megatron TransformerConfig overrides (``selective`` adds the MLP or
#: MoE layer where megatron-core can recompute it: ``recompute_overrides``).
RECOMPUTE: dict[str, dict[str, Any]] = {
    "none": {},
    "full-uniform": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    "full-block": dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=1),
    "selective": dict(recompute_granularity="selective", recompute_modules=["core_attn"]),
}
OPTIMIZERS = ("adam", "sgd")
#: The optimizer's hyperparameters, the same on both sides. Adam's eps is large enough that an
#: element whose gradient is near zero moves by at most lr * |gradient error| / eps: float32
#: summation in another order cannot flip a step (with eps 1e-8 it could move by lr).
LR = 0.01
ADAM_EPS = 1e-4
ADAM_BETAS = (0.9, 0.999)
SGD_MOMENTUM = 0.9
MAX_STEPS = 4
MAX_MICRO_BATCHES = 4
#: megatron DDP bucket sizes drawn (elements; None: megatron's default, one bucket for these models).
BUCKET_SIZES = (None, 64, 1000)


@dataclass(frozen=True)
class TrainingLoop:
    steps: int = 2
    micro_batches: int = 1
    optimizer: str = "adam"
    distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    grad_reduce_in_fp32: bool = False
    bucket_size: Optional[int] = None
    recompute: str = "none"
    #: bf16 parameters and activations with megatron's mixed precision (``OptimizerConfig.bf16``: float32
    #: main parameters in the optimizer, ``Float16OptimizerWithFloat16Params``); SGD only (``loop_problem``).
    bf16: bool = False
    #: megatron's per-token loss normalisation (``calculate_per_token_loss``): every micro-batch's loss is
    #: its masked token sum, and ``finalize_model_grads`` divides by the valid tokens of the global batch;
    #: off, each micro-batch's loss is its mean over its own valid tokens and DDP averages the replicas.
    per_token_loss: bool = False
    #: Data-parallel replicas of the global batch; None: the layout's (the reference's loop names it).
    replicas: Optional[int] = None

    def __post_init__(self) -> None:
        problem = loop_problem(dataclasses.asdict(self))
        if problem:
            raise ValueError(problem)

    @property
    def dtype_name(self) -> str:
        """The dtype the loop's parameters train in: bfloat16 where the loop says so; megatron's distributed
        optimizer takes 32- or 16-bit parameters only, and ``grad_reduce_in_fp32`` rounds float64 gradients
        to float32, so float32 with either; float64 otherwise (the harness compares in float64 wherever it
        can; the reference is float64)."""
        if self.bf16:
            return "bfloat16"
        return "float32" if self.distributed_optimizer or self.grad_reduce_in_fp32 else "float64"

    @property
    def dtype(self) -> Any:
        import torch

        return getattr(torch, self.dtype_name)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "TrainingLoop":
        problem = loop_problem(data)
        if problem:
            raise ValueError(problem)
        return cls(**data)

    def describe(self) -> str:
        parts = [f"{self.steps} steps x {self.micro_batches} mb", self.optimizer]
        if self.distributed_optimizer:
            parts.append("dist-opt")
        if self.overlap_grad_reduce:
            parts.append("overlap")
        if self.grad_reduce_in_fp32:
            parts.append("fp32-reduce")
        if self.bucket_size:
            parts.append(f"bucket {self.bucket_size}")
        if self.recompute != "none":
            parts.append(f"recompute {self.recompute}")
        if self.bf16:
            parts.append("bf16")
        if self.per_token_loss:
            parts.append("per-token loss")
        return ", ".join(parts)


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def loop_problem(data: Any) -> Optional[str]:
    """What is wrong with a loop's JSON form or fields (named, with the value and the rule), or None."""
    if not isinstance(data, Mapping):
        return f"case field loop = {data!r}: must be null or an object of TrainingLoop fields"
    names = [f.name for f in dataclasses.fields(TrainingLoop)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        return f"case field loop: unknown field {unknown[0]!r} (fields: {', '.join(names)})"
    steps, micro = data.get("steps", 2), data.get("micro_batches", 1)
    if not _int(steps) or not 1 <= steps <= MAX_STEPS:
        return f"case field loop.steps = {steps!r}: must be an integer from 1 to {MAX_STEPS}"
    if not _int(micro) or not 1 <= micro <= MAX_MICRO_BATCHES:
        return f"case field loop.micro_batches = {micro!r}: must be an integer from 1 to {MAX_MICRO_BATCHES}"
    if data.get("optimizer", "adam") not in OPTIMIZERS:
        return f"case field loop.optimizer = {data.get('optimizer')!r}: must be one of {', '.join(OPTIMIZERS)}"
    for flag in ("distributed_optimizer", "overlap_grad_reduce", "grad_reduce_in_fp32", "bf16", "per_token_loss"):
        if not isinstance(data.get(flag, False), bool):
            return f"case field loop.{flag} = {data.get(flag)!r}: must be true or false"
    if data.get("distributed_optimizer", False) and data.get("optimizer", "adam") != "adam":
        return (f"case field loop: optimizer = {data.get('optimizer')!r} with distributed_optimizer = true: "
                "megatron-core's distributed optimizer takes Adam only (its checkpointing needs Adam's state)")
    if data.get("bf16", False) and data.get("optimizer", "adam") != "sgd":
        return (f"case field loop: bf16 = true with optimizer = {data.get('optimizer', 'adam')!r}: the harness judges a "
                "16-bit loop by bounding its error with the single-device 16-bit run's, which holds where a step is "
                "linear in the gradient (SGD); Adam normalises each element's step, so an element whose gradient lies "
                "within 16-bit rounding of zero steps by up to lr either way. bf16 loops use optimizer 'sgd'")
    bucket = data.get("bucket_size")
    if bucket is not None and (not _int(bucket) or bucket < 1):
        return f"case field loop.bucket_size = {bucket!r}: must be null or a positive number of elements"
    if data.get("recompute", "none") not in RECOMPUTE:
        return f"case field loop.recompute = {data.get('recompute')!r}: must be one of {', '.join(RECOMPUTE)}"
    replicas = data.get("replicas")
    if replicas is not None and (not _int(replicas) or replicas < 1):
        return f"case field loop.replicas = {replicas!r}: must be null or an integer >= 1"
    return None


def data_parallel_size(layout: Any) -> int:
    """The dense data-parallel size of the layout in its smallest world (what feeds different data)."""
    return layout.dp(layout.min_world_size)


#: Families whose loop trains in float64 only: an MoE router's top-k is discontinuous, so a float32 run
#: against the float64 reference can send a token to another expert near a tie (the first deep run of
#: training_matches found one); the MoE family compares float64 values throughout.
FLOAT64_ONLY = ("moe",)


def layout_problem(loop: TrainingLoop, layout: Any, family: str = "gpt") -> Optional[str]:
    """What the loop cannot do at this layout (megatron-core's rules) or in this family, or None."""
    if family in FLOAT64_ONLY and loop.dtype_name != "float64":
        return (f"loop.distributed_optimizer / loop.grad_reduce_in_fp32 / loop.bf16 in the {family} family: each "
                f"trains in {loop.dtype_name}, and an MoE router's top-k flips near ties between it and the float64 "
                "reference; the MoE family trains in float64")
    if loop.replicas is not None and layout.min_world_size == 1:
        return None  # the reference: one device, the whole global batch
    if loop.bf16 and layout.tp > 1:
        return (f"loop.bf16 = true at layout {layout}: bf16 loops run at TP=1. At TP > 1 a step's partial sums "
                "round in bf16 where the single-device run's do not, and where a gradient cancels that rounding "
                "grows past any fixed multiple of the single-device error (a deep run saw 18 times at tp2 on an "
                "example float32 matches to 1e-6), so the 16-bit rule cannot judge it; float32 and float64 loops "
                "cover TP > 1")
    if loop.distributed_optimizer and data_parallel_size(layout) == 1:
        return (f"loop.distributed_optimizer = true at layout {layout}: the distributed optimizer shards its state "
                "over data-parallel ranks, and this layout has none (DP=1); use it where DP > 1")
    return None


def recompute_overrides(loop: TrainingLoop, family: str, biased: bool) -> dict[str, Any]:
    """megatron TransformerConfig overrides for the loop's recompute setting. ``selective`` recomputes core
    attention and the MLP (dense) or MoE layer, except a biased dense MLP: megatron-core's selective
    recompute of one does not return, without any LoRA (``harness.tasks.recompute.BIASED_SELECTIVE_MLP``)."""
    overrides = dict(RECOMPUTE[loop.recompute])
    if loop.recompute == "selective":
        extra = "moe" if family == "moe" else ("mlp" if not biased else None)
        overrides["recompute_modules"] = ["core_attn"] + ([extra] if extra else [])
    return overrides


def loop_overrides(loop: TrainingLoop) -> dict[str, Any]:
    """megatron TransformerConfig overrides for the loop's loss normalisation (the megatron side only)."""
    return {"calculate_per_token_loss": True} if loop.per_token_loss else {}


def training_loops(layout: Any, row: Optional[Mapping[str, Any]] = None, family: str = "gpt") -> Any:
    """A hypothesis strategy for the loop at ``layout`` (a designed ``row`` fixes its features); float64
    only for the families in ``FLOAT64_ONLY``."""
    from hypothesis import strategies as st

    from harness.strategies import pick

    dp = data_parallel_size(layout)
    float32_ok = family not in FLOAT64_ONLY

    @st.composite
    def loops(draw: Any) -> TrainingLoop:
        dist = pick(draw, row, "distributed_optimizer", st.booleans()) if dp > 1 and float32_ok else False
        # megatron-core's distributed optimizer takes Adam only.
        optimizer = "adam" if dist else pick(draw, row, "optimizer", st.sampled_from(OPTIMIZERS))
        # bf16 parameters with SGD (loop_problem), at TP=1 (layout_problem), in the families that train
        # below float64.
        bf16_ok = optimizer == "sgd" and float32_ok and layout.tp == 1
        bf16 = pick(draw, row, "bf16", st.booleans()) if bf16_ok else False
        return TrainingLoop(
            # A designed example accumulates over two micro-batches (one is the plainest case, drawn).
            steps=draw(st.sampled_from([2, 3])) if row is None else 2,
            micro_batches=draw(st.integers(1, 3)) if row is None else 2,
            optimizer=optimizer,
            distributed_optimizer=bool(dist),
            overlap_grad_reduce=pick(draw, row, "overlap_grad_reduce", st.booleans()),
            grad_reduce_in_fp32=draw(st.booleans()) if float32_ok else False,
            bucket_size=draw(st.sampled_from(BUCKET_SIZES)),
            recompute=pick(draw, row, "recompute", st.sampled_from(tuple(RECOMPUTE))),
            bf16=bool(bf16),
            per_token_loss=pick(draw, row, "per_token_loss", st.booleans()),
        )

    return loops()


def training_case(case: Any) -> Any:
    """The case as the training properties run it: the loop's dtype (``TrainingLoop.dtype_name``), adapters in
    it (``lora_dtype`` None), no dropout (masks are the forward properties' matter; here every step must
    follow the reference's exactly), training mode."""
    return case.with_(model_dtype=case.loop.dtype, lora_dtype=None, lora={**case.lora, "dropout": 0.0}, training=True,
                      micro_batches=1, value_grid=None)


def reference_training_case(case: Any, reference_impl: str) -> Any:
    """The reference's side: one device, the whole global batch (the layout's data-parallel replicas, named
    in the loop), plain torch: no DDP options, no recompute; in the loop's dtype: float64, or the
    single-device float32 / bf16 run (bf16: float32 master copies) that ``exact_training_case`` measures."""
    import torch

    from harness.layouts import ParallelLayout

    loop = dataclasses.replace(case.loop, replicas=data_parallel_size(case.layout), distributed_optimizer=False,
                               overlap_grad_reduce=False, grad_reduce_in_fp32=False, bucket_size=None, recompute="none")
    return training_case(case).with_(impl=reference_impl, layout=ParallelLayout(), contract="strict",
                                     model_dtype=case.loop.dtype, loop=loop)


def exact_training_case(case: Any, reference_impl: str) -> Any:
    """For a loop below float64 (float32, bf16): the reference's loop in float64 on that run's exact starting
    values (weights, inputs and probes rounded to its dtype: ``value_grid``), what the implementation's and the
    single-device reference's errors are measured against (``harness.compare.compare_low_precision``)."""
    import torch

    ref = reference_training_case(case, reference_impl)
    grid = case.loop.dtype_name
    return ref.with_(model_dtype=torch.float64, loop=dataclasses.replace(ref.loop, bf16=False), value_grid=(grid, grid))


def row_valid(row: Mapping[str, Any]) -> bool:
    """Whether a designed row's loop features are a loop megatron-core runs and the harness judges (the
    distributed optimizer takes Adam only; bf16 loops train with SGD)."""
    if row.get("distributed_optimizer") and row.get("optimizer", "adam") != "adam":
        return False
    return not (row.get("bf16") and row.get("optimizer", "adam") != "sgd")
