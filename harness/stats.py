"""Goodness of fit for initial adapters: the one-sample Kolmogorov-Smirnov test, in numpy and math.

``ks_test(samples, family, scale)`` tests whether the samples are drawn
from a fully specified zero-mean distribution:

* ``"normal"``: N(0, scale**2) (``scale`` is the standard deviation);
* ``"uniform"``: U(-scale, scale) (``scale`` is the bound);

by standardising them (``samples / scale``) and comparing their empirical
CDF with the standard CDF: D = sup |F_n(z) - F(z)|. The p-value is the
asymptotic Kolmogorov distribution with Stephens' small-sample correction
(Stephens 1970, as in Numerical Recipes' ``ksone``):

    p = Q_KS((sqrt(n) + 0.12 + 0.11 / sqrt(n)) * D),
    Q_KS(x) = 2 * sum_{k>=1} (-1)**(k-1) * exp(-2 k**2 x**2)

(for x < 1.18 the equivalent series
1 - sqrt(2 pi)/x * sum_{k>=1} exp(-(2k-1)**2 pi**2 / (8 x**2)), which
converges fast there).

The false-alarm rate does not rest on the asymptotics: by the
Dvoretzky-Kiefer-Wolfowitz inequality with Massart's constant,
P(D_n > d) <= 2 exp(-2 n d**2) for every n, so rejecting at p < alpha
has a true rate of at most ``ks_false_alarm_bound(n, alpha)``: 1.028e-6
for alpha = 1e-6 at n = 16384 (1.040e-6 at n = 8192).

``ks_critical_value(n, alpha)`` is the D above which the test rejects at
false-alarm rate ``alpha``; ``ks_power_lower_bound`` a lower bound on the
probability of rejecting when the samples really come from another
distribution (see there). scipy is not a dependency of the harness.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

__all__ = [
    "KSResult",
    "FAMILIES",
    "standard_cdf",
    "ks_statistic",
    "kolmogorov_sf",
    "ks_pvalue",
    "ks_critical_value",
    "ks_false_alarm_bound",
    "dkw_critical_value",
    "ks_test",
    "ks_power_lower_bound",
]

_erfc = np.frompyfunc(math.erfc, 1, 1)


def _normal_cdf(z: np.ndarray) -> np.ndarray:
    # numpy has no erf; math.erfc elementwise costs ~2 ms per 16384 values.
    return (0.5 * _erfc(-np.asarray(z, dtype=np.float64) / math.sqrt(2.0))).astype(np.float64)


def _uniform_cdf(z: np.ndarray) -> np.ndarray:
    return np.clip((np.asarray(z, dtype=np.float64) + 1.0) / 2.0, 0.0, 1.0)


#: Standardised zero-mean families: name -> CDF of the family at scale 1
#: (normal: std 1; uniform: on [-1, 1]).
FAMILIES: dict[str, Callable[[np.ndarray], np.ndarray]] = {"normal": _normal_cdf, "uniform": _uniform_cdf}


def standard_cdf(family: str) -> Callable[[np.ndarray], np.ndarray]:
    if family not in FAMILIES:
        raise ValueError(f"unknown distribution family {family!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[family]


def _as_array(samples: Any) -> np.ndarray:
    if hasattr(samples, "detach"):  # a torch tensor, without importing torch here
        samples = samples.detach().double().cpu().numpy()
    return np.asarray(samples, dtype=np.float64).ravel()


def ks_statistic(samples: Any, cdf: Callable[[np.ndarray], np.ndarray]) -> float:
    """D = sup_z |F_n(z) - F(z)| of the samples against the continuous CDF ``cdf``."""
    z = np.sort(_as_array(samples))
    n = z.size
    if n == 0:
        raise ValueError("ks_statistic needs at least one sample")
    f = cdf(z)
    i = np.arange(1, n + 1, dtype=np.float64)
    return float(max(np.max(i / n - f), np.max(f - (i - 1) / n)))


def kolmogorov_sf(x: float) -> float:
    """P(K > x) for the Kolmogorov distribution K (the limit of sqrt(n) D_n)."""
    if x <= 0.0:
        return 1.0
    if x < 1.18:
        # Jacobi-theta form of the CDF: fast where the alternating series is slow.
        y = math.exp(-(math.pi**2) / (8.0 * x * x))
        total, k = 0.0, 1
        while True:
            term = y ** ((2 * k - 1) ** 2)
            total += term
            if term < 1e-17 * total or k > 100:
                break
            k += 1
        return max(0.0, 1.0 - math.sqrt(2.0 * math.pi) / x * total)
    total, k = 0.0, 1
    while True:
        term = math.exp(-2.0 * k * k * x * x)
        total += term if k % 2 else -term
        if term < 1e-17 * abs(total) or term == 0.0 or k > 100:
            break
        k += 1
    return min(1.0, max(0.0, 2.0 * total))


def _effective_sqrt_n(n: int) -> float:
    root = math.sqrt(n)
    return root + 0.12 + 0.11 / root


def ks_pvalue(d: float, n: int) -> float:
    """Asymptotic p-value of a one-sample KS statistic ``d`` over ``n`` samples (Stephens' correction)."""
    return kolmogorov_sf(_effective_sqrt_n(n) * d)


def ks_critical_value(n: int, alpha: float) -> float:
    """The smallest D that ``ks_pvalue`` rejects at level ``alpha`` (bisection on Q_KS)."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha={alpha!r} must lie in (0, 1)")
    lo, hi = 0.0, 10.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if kolmogorov_sf(mid) > alpha:
            lo = mid
        else:
            hi = mid
    return hi / _effective_sqrt_n(n)


def ks_false_alarm_bound(n: int, alpha: float) -> float:
    """A rigorous bound on P(reject) for samples of the tested law: DKW-Massart at the critical D."""
    d = ks_critical_value(n, alpha)
    return min(1.0, 2.0 * math.exp(-2.0 * n * d * d))


def dkw_critical_value(n: int, alpha: float) -> float:
    """The D above which P(D_n > D) <= ``alpha`` for every n (DKW with Massart's constant):
    sqrt(ln(2 / alpha) / (2 n)). Rejecting above it has a false-alarm rate of at most ``alpha``,
    exactly, not asymptotically."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha={alpha!r} must lie in (0, 1)")
    if n < 1:
        raise ValueError(f"dkw_critical_value needs n >= 1, got {n}")
    return math.sqrt(math.log(2.0 / alpha) / (2.0 * n))


@dataclass(frozen=True)
class KSResult:
    """One KS test: the family and scale tested, n, D, the p-value, and the samples' own std and kurtosis
    (about zero: sqrt(mean x^2) and mean x^4 / mean(x^2)^2; a normal's kurtosis is 3, a uniform's 1.8)."""

    family: str
    scale: float
    n: int
    d: float
    p: float
    sample_std: float
    sample_kurtosis: float = float("nan")

    @property
    def expected_std(self) -> float:
        """The std the tested distribution has (uniform on [-b, b]: b / sqrt(3))."""
        return self.scale if self.family == "normal" else self.scale / math.sqrt(3.0)

    @property
    def expected_kurtosis(self) -> float:
        return 3.0 if self.family == "normal" else 1.8

    def rejects(self, alpha: float) -> bool:
        return self.p < alpha

    def describe(self) -> str:
        return f"n={self.n} D={self.d:.3g} p={self.p:.2g}"


def ks_test(samples: Any, family: str, scale: float) -> KSResult:
    """KS test of ``samples`` against ``family`` (``"normal"``: std ``scale``; ``"uniform"``: bound ``scale``)."""
    cdf = standard_cdf(family)
    if not scale > 0 or not math.isfinite(scale):
        raise ValueError(f"ks_test needs a positive finite scale, got {scale!r}")
    x = _as_array(samples)
    if not np.all(np.isfinite(x)):
        # A non-finite initial value is as far from any distribution as it gets.
        return KSResult(family, float(scale), x.size, 1.0, 0.0, float("nan"), float("nan"))
    d = ks_statistic(x / scale, cdf)
    m2 = float(np.mean(x * x))
    kurtosis = float(np.mean((x * x) ** 2)) / (m2 * m2) if m2 > 0 else float("nan")
    return KSResult(family, float(scale), x.size, d, ks_pvalue(d, x.size), math.sqrt(m2), kurtosis)


def ks_power_lower_bound(n: int, alpha: float, true_cdf_at: float, tested_cdf_at: float) -> float:
    """A lower bound on the power of ``ks_test`` at level ``alpha`` against a true distribution G.

    For any point z, D >= |F_n(z) - F(z)| and n F_n(z) ~ Binomial(n, G(z)),
    so P(reject) >= P(|F_n(z) - F(z)| > D_crit). Evaluated at the z where
    |G - F| is largest (pass G(z) as ``true_cdf_at`` and F(z) as
    ``tested_cdf_at``), with the binomial's normal approximation (n is in
    the ten thousands here).
    """
    crit = ks_critical_value(n, alpha)
    g, f = true_cdf_at, tested_cdf_at
    sd = math.sqrt(max(g * (1.0 - g), 1e-300) / n)

    def phi(x: float) -> float:
        return 0.5 * math.erfc(-x / math.sqrt(2.0))

    # |F_n - F| > crit  <=>  F_n > f + crit  or  F_n < f - crit
    return (1.0 - phi((f + crit - g) / sd)) + phi((f - crit - g) / sd)
