"""Tolerances and error statistics for comparing a sharded run with the reference.

What may differ between two correct layouts is the order of floating-point
sums: a row-parallel matmul adds t partial products, a gathered adapter
output is the same dot products split across ranks. Reordering a sum of K
terms changes it by at most ~K * eps * sum|terms| (typically sqrt(K) * eps),
and attention and RMSNorm downstream can amplify that by the problem's
condition number, which grows with large adapter scales (alpha/r up to 32).

So the equivalence properties run the base model in float64 (``GPTCase.
model_dtype``): reordering then costs ~1e-13 of a tensor's largest entry
even after amplification, and we allow ``rtol = 1e-9``: three orders of
magnitude of headroom, and eight below what a real sharding bug does (a
wrong scale, a missing gather or a swapped gate/up slice changes outputs
by the adapter's contribution, which the harness makes O(1) relative).

When some of the computation is float32 (a float32 model, or
``lora_dtype=float32`` adapters in a float64 model) the bound is ``rtol =
1e-3`` of the largest reference magnitude (+ ``atol = 1e-6``): over 400
float32 examples at TP=2 (800 comparisons) the median normwise error was
2.7e-7 and the worst 1.4e-4 (adapter scale 8 on two layers, in a
gradient), so 1e-3 keeps a 7x margin over the worst seen while staying two
orders below a real bug. A 16-bit model or adapter dtype is compared by
error ratio instead (``compare_low_precision``): the sharded run's error
against a float64 reference on the same exact values, against a multiple
of the single-device 16-bit run's error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, asdict
from typing import Any, Optional

import torch

__all__ = [
    "Tolerance", "ErrorStats", "tolerance_for", "compare_tensors",
    "is_low_precision", "low_precision_eps", "compare_low_precision", "LOW_PRECISION_FACTOR", "LOW_PRECISION_FLOOR",
    "ILL_CONDITIONED", "ill_conditioned",
]


@dataclass(frozen=True)
class Tolerance:
    rtol: float = 1e-3
    atol: float = 1e-6


FLOAT64 = Tolerance(rtol=1e-9, atol=1e-12)
FLOAT32 = Tolerance(rtol=1e-3, atol=1e-6)


def _dtype_name(dtype: Any) -> str:
    return str(dtype).replace("torch.", "")


def tolerance_for(lora_dtype: Any, model_dtype: Any = "float32") -> Tolerance:
    """The bound for the least precise dtype in play: the model's, or the adapter's (None = the model's)."""
    names = {_dtype_name(model_dtype), _dtype_name(lora_dtype if lora_dtype is not None else model_dtype)}
    low = [n for n in names if n in ("bfloat16", "float16", "half")]
    if low:
        eps = max(torch.finfo(getattr(torch, "float16" if n == "half" else n)).eps for n in low)
        return Tolerance(rtol=8 * eps, atol=1e-5)
    if names == {"float64"}:
        return FLOAT64
    return FLOAT32


@dataclass
class ErrorStats:
    """How far ``actual`` is from ``expected``, and whether that is within tolerance."""

    max_abs: float
    max_rel: float  # max_abs / max|expected|
    mean_abs: float
    ref_max: float
    numel: int
    worst_index: Optional[tuple[int, ...]]
    passed: bool
    reason: str = ""
    #: Low-precision comparisons: the single-device reference's error against float64.
    baseline_abs: Optional[float] = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare_tensors(actual: Optional[torch.Tensor], expected: Optional[torch.Tensor], tol: Tolerance) -> ErrorStats:
    """Normwise comparison: max|a - e| <= atol + rtol * max|e|, NaN anywhere fails."""
    if actual is None or expected is None:
        missing = "actual" if actual is None else "expected"
        return ErrorStats(math.inf, math.inf, math.inf, 0.0, 0, None, False, f"{missing} is None (no gradient reached it)")
    if tuple(actual.shape) != tuple(expected.shape):
        return ErrorStats(
            math.inf, math.inf, math.inf, 0.0, expected.numel(), None, False,
            f"shape {tuple(actual.shape)} != expected {tuple(expected.shape)}",
        )
    a = actual.detach().double()
    e = expected.detach().double()
    if not torch.isfinite(a).all():
        return ErrorStats(math.inf, math.inf, math.inf, float(e.abs().max()) if e.numel() else 0.0, e.numel(), None, False, "non-finite values")
    diff = (a - e).abs()
    if diff.numel() == 0:
        return ErrorStats(0.0, 0.0, 0.0, 0.0, 0, None, True)
    max_abs = float(diff.max())
    ref_max = float(e.abs().max())
    worst = tuple(int(i) for i in torch.unravel_index(torch.argmax(diff), diff.shape))
    bound = tol.atol + tol.rtol * ref_max
    passed = max_abs <= bound
    return ErrorStats(
        max_abs=max_abs,
        max_rel=max_abs / ref_max if ref_max > 0 else (0.0 if max_abs == 0 else math.inf),
        mean_abs=float(diff.mean()),
        ref_max=ref_max,
        numel=diff.numel(),
        worst_index=worst,
        passed=passed,
        reason="" if passed else f"max|diff|={max_abs:.3g} at {worst} > {bound:.3g} (atol {tol.atol:g} + rtol {tol.rtol:g} * max|ref| {ref_max:.3g})",
    )


# ---------------------------------------------------------------- 16-bit

#: A sharded 16-bit run may be this many times as far from the float64
#: result as the single-device 16-bit reference is (see ``compare_low_precision``).
#: Measured with lora.megatron at tp2 and tp2-sp over 80 drawn 16-bit
#: examples (bf16 models, bf16/fp16 adapters; 634 output, input-gradient
#: and adapter-gradient comparisons): the sharded error over the
#: single-device error had median 1.0 and maximum 3.9 (an fc1 adapter
#: gradient, bf16 adapters in a float64 model). 8 keeps a 2x margin over
#: that; a sharding bug moves results by the adapter's contribution, tens
#: of times a 16-bit single-device error.
LOW_PRECISION_FACTOR = 8.0
#: ... plus this many eps of the 16-bit dtype times the largest float64 magnitude.
LOW_PRECISION_FLOOR = 2.0
#: A 16-bit comparison whose single-device 16-bit error is already this share of the largest float64
#: magnitude decides nothing: the tensor is mostly rounding noise in 16 bits (a gradient that cancels), and
#: a sharded run that rounds its partial sums elsewhere lands anywhere in that noise. Seen: deep seed 1302,
#: bf16 adapter gradients at tp2 (with or without pipeline stages) whose single-device errors were 5% and
#: 10% of their largest entries and whose correct sharded errors 9 and 8.6 times those. Such a failing
#: comparison is undecidable, never charged (``ill_conditioned``); a sharding bug moves well-conditioned
#: tensors of the same example too, which stay decided.
ILL_CONDITIONED = 1.0 / 32.0


def ill_conditioned(stats: "ErrorStats") -> bool:
    """Whether a failed 16-bit comparison's single-device error makes it undecidable (``ILL_CONDITIONED``)."""
    single = stats.baseline_abs
    return (single is not None and math.isfinite(single) and stats.ref_max > 0
            and single >= ILL_CONDITIONED * stats.ref_max and math.isfinite(stats.max_abs))


def _low_names(*dtypes: Any) -> list[str]:
    return [n for n in (_dtype_name(d) for d in dtypes if d is not None) if n in ("bfloat16", "float16")]


def is_low_precision(lora_dtype: Any, model_dtype: Any) -> bool:
    """Whether the model or the adapters compute in a 16-bit dtype."""
    return bool(_low_names(lora_dtype, model_dtype))


def low_precision_eps(lora_dtype: Any, model_dtype: Any) -> float:
    """eps of the least precise 16-bit dtype in play."""
    return max(torch.finfo(getattr(torch, n)).eps for n in _low_names(lora_dtype, model_dtype))


def compare_low_precision(
    actual: Optional[torch.Tensor], reference: Optional[torch.Tensor], exact: Optional[torch.Tensor], eps: float
) -> tuple[ErrorStats, Tolerance]:
    """A 16-bit sharded result against the float64 result, relative to the single-device 16-bit error.

    A fixed tolerance cannot separate 16-bit rounding from a sharding bug:
    rounding errors grow with the problem's conditioning, which the drawn
    examples vary over orders of magnitude. So the single-device reference
    runs in the same 16-bit dtypes on the same weights (``reference``) and a
    float64 reference on those exact values (``exact``, the
    ``reference64`` run), and the sharded error must satisfy

        max|actual - exact| <= LOW_PRECISION_FACTOR * max|reference - exact|
                               + LOW_PRECISION_FLOOR * eps * max|exact|

    A sharded run rounds at other points than the single-device one (partial
    sums before an all-reduce, a gathered adapter output), so its error is
    of the same order but not equal; a sharding bug changes results by the
    adapter's contribution, O(1) relative. The floor covers tensors whose
    single-device error happens to be tiny. Both errors are reported
    (``ErrorStats.max_abs`` and ``baseline_abs``).
    """
    if actual is None or reference is None or exact is None:
        missing = "actual" if actual is None else ("the 16-bit reference" if reference is None else "the float64 reference")
        return ErrorStats(math.inf, math.inf, math.inf, 0.0, 0, None, False, f"{missing} is None (no gradient reached it)"), Tolerance(0.0, 0.0)
    for other, what in ((reference, "the 16-bit reference"), (exact, "the float64 reference")):
        if tuple(actual.shape) != tuple(other.shape):
            return ErrorStats(math.inf, math.inf, math.inf, 0.0, other.numel(), None, False,
                              f"shape {tuple(actual.shape)} != {what}'s {tuple(other.shape)}"), Tolerance(0.0, 0.0)
    if not torch.isfinite(reference.detach().double()).all():
        # The single-device 16-bit run overflowed (float16's range is 65504):
        # nothing to measure the sharded run against; not an implementation bug.
        return ErrorStats(0.0, 0.0, 0.0, 0.0, reference.numel(), None, True,
                          "the single-device 16-bit reference overflowed: not compared", math.inf), Tolerance(0.0, math.inf)
    e = exact.detach().double()
    ref_max = float(e.abs().max()) if e.numel() else 0.0
    single = float((reference.detach().double() - e).abs().max()) if e.numel() else 0.0
    bound = LOW_PRECISION_FACTOR * single + LOW_PRECISION_FLOOR * eps * ref_max
    tol = Tolerance(rtol=0.0, atol=bound)
    stats = compare_tensors(actual, exact, tol)
    stats.baseline_abs = single
    if not stats.passed and stats.reason != "non-finite values":
        stats.reason = (
            f"16-bit error against float64 {stats.max_abs:.3g} at {stats.worst_index} > {bound:.3g} = "
            f"{LOW_PRECISION_FACTOR:g} x the single-device 16-bit error {single:.3g} + {LOW_PRECISION_FLOOR:g} eps "
            f"({eps:.3g}) x max|float64| {ref_max:.3g}"
        )
    return stats, tol
