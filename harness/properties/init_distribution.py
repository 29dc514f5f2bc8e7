"""init_follows_distribution: every initial adapter, gathered, follows SPEC's init distribution on its FULL shape.

``init_matches_layouts`` compares the implementation with itself at TP=1,
so a wrong distribution drawn the same way at every layout (Xavier drawn
uniform, Kaiming with the wrong slope) passes it. This property judges the
draw against SPEC itself, at the case's layout, TP=1 included.

Evidence: the ``init`` run (``harness.tasks.init``): the implementation
applied, with the case's seed, init methods, patterns, dtypes and mode, to a
one-layer GPT of hidden 128, ffn 256, vocab 128, at rank r = 128 (rounded
up to a multiple of TP). Its shards are put back together per data-parallel
replica from the partition table (a replica equal to one already tested is
not tested again). For A (r, in) and B (out, r) of every adapted module,
with fan_in = columns and fan_out = rows of the full matrix (torch.nn.init's
``_calculate_fan_in_and_fan_out`` for a 2-D weight):

| method | SPEC distribution (torch.nn.init) |
|---|---|
| xavier | N(0, s^2), s = sqrt(2 / (fan_in + fan_out))  (``xavier_normal_``, gain 1) |
| xavier_uniform | U(-b, b), b = sqrt(6 / (fan_in + fan_out))  (``xavier_uniform_``) |
| kaiming | U(-b, b), b = sqrt(3) * gain / sqrt(fan_in), gain = sqrt(2 / (1 + a^2)), a = sqrt(5): b = 1 / sqrt(fan_in)  (``kaiming_uniform_``, fan_in mode) |
| normal | N(0, 0.2^2) |
| zero | every entry exactly 0 |

The test (``harness.stats.ks_test``): a one-sample Kolmogorov-Smirnov test of
each matrix on its own, standardised by SPEC's scale, against the standard
normal or uniform CDF. An example that tests m matrices rejects one whose
D exceeds the DKW-Massart critical value at ``FALSE_ALARM / m``
(``harness.stats.dkw_critical_value``: sqrt(ln(2m / 1e-6) / (2n))), so a
correct implementation fails the example with probability at most
``harness.results.FALSE_ALARM`` = 1e-6 in all (Bonferroni over the m
tests; the bound holds for every n, not only asymptotically). Each matrix has n >= 16384
entries (128 x 128: A of qkv, proj, fc1 and the output layer, B of proj,
fc2 and the output layer; 32768 or more for the others). A "zero" matrix
must be exactly zero (no statistics involved).

False alarms: at most 1e-6 per example, whatever the number of matrices
(above). A dense example tests at most 10 matrices per distinct replica (5
adapted modules x A and B): the critical D at n = 16384 is then 0.0229
(0.0210 for a single test at 1e-6). Draws are seeded, so a false alarm
would replay identically.

Power (``harness.stats.ks_power_lower_bound``: a lower bound from the
binomial count at the point of largest CDF difference; checked by
simulation in tests/properties/test_init_distribution.py). The critical D at n = 16384
and 1e-6 is 0.0210.

* Fans on the shard at TP=2 (Megatron-Bridge's behaviour): for Xavier the
  variance is off by at least (r + in) / (r/2 + in) = 4/3 (column A of a
  hidden-128 input; row A of proj; B of a 128-row output), std ratio 1.155:
  normal family CDF gap 0.0347, miss probability <= 2.0e-6 per matrix
  (<= 5.6e-4 when the TP shards are duplicates, 8192 distinct values);
  uniform family gap 0.067, miss <= 1e-122. Variance off by 3/2 (fc2's A,
  qkv's B): miss <= 1.7e-20 (normal). Kaiming row-parallel A: bound off by
  sqrt(2), gap 0.146, miss < 1e-300. (Kaiming's column A and every B keep
  their fan_in on the shard: the same distribution, nothing to detect.)
* Wrong family with the right variance (Xavier drawn uniform, as
  ``xavier_uniform_`` draws): CDF gap 0.0572, miss <= 6.6e-26 at n = 16384.

Under the ``bridge`` contract (Megatron-Bridge computes fans on the shard),
a matrix that fails SPEC's test while every distinct TP shard passes the
same test against the distribution of the shard's own fans is an advisory
finding; any other mismatch (wrong family, other scale, non-zero "zero")
is binding under either contract.

Zero init: when A or B is "zero", the adapted model's logits must equal the
base model's bitwise at step 0 (the init run records both, on the same
seeded input, on every rank).

Findings name the matrix and module, the method with the full fans, n, D,
p, SPEC's distribution, the sample std against SPEC's and the sample
kurtosis against the family's (3 normal, 1.8 uniform: a right std with a
wrong kurtosis is a wrong family), and (at TP > 1, where they differ) the
scale the shard's fans would give. Each test is also recorded as a
comparison (``max_abs`` = D against ``atol`` = the critical D, so
err/tol = D / D_crit < 1 passes).

MoE family: the init run (``harness.tasks.init.run_moe_init_case``) puts the
case's experts, routing, sharing and normalisation on init-sized widths
(hidden, expert and shared-expert widths 128, expert rank 128) at the case's
EP/ETP layout, and every rank sends full matrices by global name (expert
adapters gathered over ETP, per-expert ones collected over EP): every
expert A and B, shared or per expert, is tested like a dense one. An MoE
example tests more matrices (up to two per expert and layer), so its
false-alarm bound is that many times 1.03e-6. No zero-init forward there.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from harness.compare import ErrorStats, Tolerance
from harness.properties import Property, register
from harness.properties._gather import layout_violations, no_adapter_reason, replicas
from harness.results import FALSE_ALARM, Check, Comparison, Location
from harness.sharding import Partition, shard
from harness.stats import KSResult, dkw_critical_value, ks_test

__all__ = ["ALPHA", "NORMAL_STD", "spec_distribution", "describe_distribution", "check"]

NAME = "init_follows_distribution"

#: Per-test false-alarm rate of one test alone; an example with m tests uses ALPHA / m (Bonferroni).
ALPHA = FALSE_ALARM
#: SPEC: "normal" is Normal(0, 0.2), 0.2 being the standard deviation (as in Megatron-Bridge).
NORMAL_STD = 0.2


def spec_distribution(method: str, fan_in: int, fan_out: int) -> Optional[tuple[str, float]]:
    """(family, scale) of SPEC's ``method`` for a (fan_out, fan_in) matrix; None for ``zero``.

    ``scale`` is the std for ``"normal"`` and the bound for ``"uniform"``.
    """
    if method == "xavier":
        return "normal", math.sqrt(2.0 / (fan_in + fan_out))
    if method == "xavier_uniform":
        return "uniform", math.sqrt(6.0 / (fan_in + fan_out))
    if method == "kaiming":
        a = math.sqrt(5.0)
        gain = math.sqrt(2.0 / (1.0 + a * a))
        return "uniform", math.sqrt(3.0) * gain / math.sqrt(fan_in)
    if method == "normal":
        return "normal", NORMAL_STD
    if method == "zero":
        return None
    raise ValueError(f"unknown init method {method!r}")


def describe_distribution(family: str, scale: float) -> str:
    return f"N(0, {scale:.4g}^2)" if family == "normal" else f"U(-{scale:.4g}, {scale:.4g})"


def _std_of(family: str, scale: float) -> float:
    return scale if family == "normal" else scale / math.sqrt(3.0)


def _rejects(result: KSResult, alpha: float) -> bool:
    """D beyond the DKW-Massart critical value at ``alpha``: a false alarm has probability <= alpha."""
    return result.d > dkw_critical_value(result.n, alpha)


def _comparison(loc: Location, result: KSResult, alpha: float) -> Comparison:
    crit = dkw_critical_value(result.n, alpha)
    passed = not _rejects(result, alpha)
    stats = ErrorStats(
        max_abs=result.d, max_rel=result.d / crit, mean_abs=result.d, ref_max=0.0, numel=result.n,
        worst_index=None, passed=passed,
        reason="" if passed else f"KS D={result.d:.3g} > {crit:.3g} (DKW critical value at alpha {alpha:.2g}; p={result.p:.2g})",
    )
    return Comparison(loc, stats, Tolerance(rtol=0.0, atol=crit))


def _local_pieces(full: torch.Tensor, part: Any, tp: int) -> list[torch.Tensor]:
    """The distinct TP shards of a gathered matrix (a duplicated shard counts once)."""
    if part.dim is None or tp == 1:
        return [full]
    pieces: list[torch.Tensor] = []
    for rank in range(tp):
        piece = shard(full, Partition(part.dim, part.gated), rank, tp)
        if not any(piece.shape == p.shape and torch.equal(piece, p) for p in pieces):
            pieces.append(piece)
    return pieces


def _shard_fans(full_shape: tuple[int, ...], part: Any, tp: int) -> tuple[int, int]:
    """(fan_in, fan_out) of one TP shard of a (fan_out, fan_in) matrix."""
    rows, cols = full_shape
    if part.dim == 0:
        rows //= tp
    elif part.dim == 1:
        cols //= tp
    return cols, rows


def _check_matrix(
    result: Check, case: Any, pname: str, full: torch.Tensor, part: Any, ranks: tuple[int, ...], tp: int, alpha: float,
) -> None:
    which = "A" if ".adapter.linear_in." in pname else "B"
    method = case.lora.get("lora_A_init_method" if which == "A" else "lora_B_init_method", "xavier" if which == "A" else "zero")
    module = part.module
    rows, cols = tuple(full.shape)
    fan_in, fan_out = cols, rows
    what = f"{which} of {module} ({method}, full fans in={fan_in} out={fan_out})"
    loc = Location("initial distribution", pname, ranks)
    spec = spec_distribution(method, fan_in, fan_out)
    x = full.detach().double()
    if spec is None:
        nonzero = int(torch.count_nonzero(x))
        stats = ErrorStats(
            max_abs=float(x.abs().max()) if x.numel() else 0.0, max_rel=0.0, mean_abs=float(x.abs().mean()) if x.numel() else 0.0,
            ref_max=0.0, numel=x.numel(), worst_index=None, passed=nonzero == 0,
        )
        result.comparisons.append(Comparison(loc, stats, Tolerance(rtol=0.0, atol=0.0)))
        if nonzero:
            result.fail(
                f"{what}: {nonzero} of {x.numel()} entries non-zero (max |x| {stats.max_abs:.3g}, sample std "
                f"{float(x.pow(2).mean().sqrt()):.3g}); SPEC's zero init is all exactly 0",
                kind="contract", check="init_distribution", location=loc,
            )
        return
    family, scale = spec
    test = ks_test(x, family, scale)
    result.comparisons.append(_comparison(loc, test, alpha))
    if not _rejects(test, alpha):
        return
    message = (
        f"{what}: {test.describe()} against SPEC's {describe_distribution(family, scale)}; "
        f"sample std {test.sample_std:.3g}, SPEC std {_std_of(family, scale):.3g}; "
        f"sample kurtosis {test.sample_kurtosis:.2f}, SPEC's {test.expected_kurtosis:g} ({family})"
    )
    shard_explains = False
    if tp > 1 and part.dim is not None:
        s_in, s_out = _shard_fans((rows, cols), part, tp)
        s_family, s_scale = spec_distribution(method, s_in, s_out)  # type: ignore[misc]
        if not math.isclose(s_scale, scale, rel_tol=1e-12):
            pieces = _local_pieces(x, part, tp)
            tests = [ks_test(p, s_family, s_scale) for p in pieces]
            shard_explains = not any(_rejects(t, alpha) for t in tests)
            message += (
                f" (the shard's fans in={s_in} out={s_out} give {_std_of(s_family, s_scale):.3g}"
                + ("; every TP shard fits that distribution: fans computed on the shard, Megatron-Bridge's behaviour)"
                   if shard_explains else ", and the shards do not fit that either)")
            )
    advisory = shard_explains and case.contract == "bridge"
    result.fail(message, kind="contract", check="init_distribution", binding=not advisory, location=loc)


def check(ev) -> Check:
    records = ev.init
    broken = layout_violations(NAME, records)
    if broken is not None:
        return broken
    case = ev.case
    result = Check(NAME)
    for rec in records:
        zero = rec.extras.zero_forward
        if zero is not None and not zero.equal:
            result.fail(
                f"rank {rec.rank}: with a zero init (A {case.lora.get('lora_A_init_method', 'xavier')}, "
                f"B {case.lora.get('lora_B_init_method', 'zero')}) the adapted model's logits differ from the base "
                f"model's at step 0 (max |diff| {zero.max_abs:.3g}); SPEC: the adapter adds exactly 0",
                kind="contract", check="zero_init_forward",
            )
    tp = records[0].tp_size if records else 1
    partitions = records[0].partitions if records else {}
    tested: list[dict[str, Any]] = []
    todo: list[tuple[str, Any, Any, tuple[int, ...]]] = []
    for ranks, full in replicas(records, case.layout, "initial_adapters"):
        if any(set(seen) == set(full) and all(
            full[k] is not None and seen[k] is not None and full[k].shape == seen[k].shape and torch.equal(full[k], seen[k])
            for k in full
        ) for seen in tested):
            continue
        tested.append(full)
        for pname in full:  # the model's order
            tensor = full[pname]
            part = partitions[pname]
            if tensor is None:
                result.fail(f"initial value of {pname} missing on some rank of {list(ranks)}", kind="contract", check="init_distribution")
                continue
            if tuple(tensor.shape) != tuple(part.full_shape):
                result.fail(f"{pname}: gathered shape {tuple(tensor.shape)}, SPEC's full shape {tuple(part.full_shape)}",
                            kind="contract", check="init_distribution")
                continue
            todo.append((pname, tensor, part, ranks))
    if not todo and not result.findings:
        result.nothing_to_check(no_adapter_reason(records[0] if records else None) or "no initial adapter to test")
    # Bonferroni over the statistical tests of this example: <= FALSE_ALARM in all.
    statistical = sum(_method_of(case, pname) != "zero" for pname, *_ in todo)
    alpha = FALSE_ALARM / max(1, statistical)
    for pname, tensor, part, ranks in todo:
        _check_matrix(result, case, pname, tensor, part, ranks, tp, alpha)
    return result


def _method_of(case: Any, pname: str) -> str:
    if ".adapter.linear_in." in pname:
        return case.lora.get("lora_A_init_method", "xavier")
    return case.lora.get("lora_B_init_method", "zero")


PROPERTY = register(Property(
    pipeline=True,
    name=NAME,
    check=check,
    needs=("init",),
    kind="contract",
    families=("gpt", "moe"),
    doc="initial adapters, gathered, follow SPEC's init distribution over the full shape (KS test at 1e-6 per matrix, "
        "rank 128 on a hidden-128 GPT or MoE GPT, expert adapters included); a zero init leaves the model's logits "
        "bitwise unchanged",
))
