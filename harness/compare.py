"""Tolerances and error statistics for comparing a sharded run with the reference.

Why these tolerances (float32): a sharded run computes the same sums as the
reference in a different order (a row-parallel matmul adds t partial
products; a gathered adapter output is the same dot products split across
ranks). Reordering a float32 sum of K terms changes it by at most about
K * eps * sum|terms| (eps = 2**-24 ~ 6e-8), and typically sqrt(K) * eps.
With the harness's model sizes (K <= 256, at most two layers, softmax and
RMSNorm in between) the observed normwise error is ~1e-6 of the tensor's
largest entry. We allow ``rtol = 1e-4`` of the largest reference magnitude
plus ``atol = 1e-6``: two orders of magnitude of headroom over reordering,
and still three orders of magnitude below what a real sharding bug produces
(a wrong scale, a missing gather or a swapped gate/up slice changes outputs
by the adapter's contribution, which the harness makes O(1) relative).

When the adapter computes in a 16-bit dtype every adapter product is rounded
to that dtype's precision, so the bound is widened to that dtype's epsilon
times a small factor; float64 adapters are held to the float32 bound since the
result is cast back to float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, asdict
from typing import Any, Optional

import torch

__all__ = ["Tolerance", "ErrorStats", "tolerance_for", "compare_tensors"]


@dataclass(frozen=True)
class Tolerance:
    rtol: float = 1e-4
    atol: float = 1e-6


FLOAT32 = Tolerance()


def tolerance_for(lora_dtype: Any) -> Tolerance:
    name = str(lora_dtype).replace("torch.", "") if lora_dtype is not None else "float32"
    if name in ("bfloat16", "float16", "half"):
        eps = torch.finfo(getattr(torch, name if name != "half" else "float16")).eps
        return Tolerance(rtol=8 * eps, atol=1e-5)
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
