"""Put adapter shards back together per data-parallel replica, from the partition table each rank sent."""

from __future__ import annotations

from typing import Any, Optional

from harness.compare import Tolerance, compare_tensors
from harness.evidence import evidence_field
from harness.results import Check, Location
from harness.sharding import Partition, unshard


def _field(rec: Any, field: Any) -> dict[str, Any]:
    """A per-rank dict: a record attribute, ``extras.<field>`` (a declared field of the record's
    evidence type, ``harness.evidence.evidence_field``: anything else raises; None, not produced on
    this rank, reads as no tensor), or what a function of the record returns."""
    if callable(field):
        return dict(field(rec))
    if field.startswith("extras."):
        value = evidence_field(rec.extras, field[len("extras."):])
        return {} if value is None else dict(value)
    return dict(getattr(rec, field))


def replicas(records: list[Any], layout: Any, field: Any) -> list[tuple[tuple[int, ...], dict[str, Optional[Any]]]]:
    """[(ranks of one TP group, {param: full tensor or None})] for the per-rank dict ``field``
    (a record attribute, ``extras.<field>``: ``harness.evidence.evidence_path``, or a function of the
    record, e.g. one step's adapters of the training loop).

    Records whose tensors are already full (every partition replicated, as
    the MoE task sends them) are compared rank by rank.
    """
    if records and all(p.dim is None for rec in records for p in rec.partitions.values()):
        return [((rec.rank,), _field(rec, field)) for rec in records]
    out = []
    for ranks in layout.expected_groups(len(records))["tp"]:
        members = sorted((records[r] for r in ranks), key=lambda rec: rec.tp_rank)
        full: dict[str, Optional[Any]] = {}
        for pname, part in members[0].partitions.items():
            pieces = [_field(m, field).get(pname) for m in members]
            full[pname] = None if any(p is None for p in pieces) else unshard(pieces, Partition(part.dim, part.gated))
        out.append((tuple(ranks), full))
    return out


def compare_adapter_sets(
    check: Check, quantity: str, got: dict[str, Any], want: dict[str, Any], ranks: tuple[int, ...], tol: Tolerance,
    *, kind: str = "numeric", sub: str = "", binding: bool = True,
) -> None:
    """Every adapter tensor of one replica against the reference's; the adapted sets must agree."""
    if set(got) != set(want):
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        check.fail(f"adapted parameters differ from the reference: missing {missing}, unexpected {extra}", check="adapted_set")
        return
    for pname in sorted(got):
        stats = compare_tensors(got[pname], want[pname], tol)
        check.compare(Location(quantity, pname, ranks), stats, tol, kind=kind, check=sub, binding=binding)


def no_adapter_reason(reference: Any) -> str:
    """Why an example has no adapter to judge ("" when it has one): the reference adapted no module.

    A comparison of an unadapted model still runs (an implementation that
    adapts or perturbs something anyway fails it), but it says nothing
    about LoRA, so the example is reported vacuous, never as a pass.
    """
    if getattr(reference, "partitions", None):
        return ""
    return "no module of this model matches the target patterns (the reference adapted nothing): no adapter to check"


def pattern_hint(lora: dict[str, Any], params: list[str]) -> str:
    """Why the adapted set may differ: a module SPEC's matching leaves out but a pattern matches when its
    '.' is read as a regular-expression wildcard (a matcher that turns '*' into '.*' and escapes nothing)."""
    import re

    patterns = list(lora.get("target_modules") or []) + list(lora.get("exclude_modules") or [])
    modules = sorted({p.split(".adapter.")[0].split(".to_wrap.")[0] for p in params})
    for module in modules:
        for pattern in patterns:
            if "*" not in pattern:
                continue
            literal = re.fullmatch(".*".join(re.escape(part) for part in pattern.split("*")), module)
            regex = re.fullmatch(pattern.replace("*", ".*"), module)
            if regex and not literal:
                return (f" ({module} matches pattern {pattern!r} only if its '.' is read as a regular-expression "
                        "wildcard; SPEC: '*' is the only wildcard, every other character is literal)")
    return ""


def rank_findings(prop: str, records: list[Any]) -> Check:
    """A check holding every finding each rank reported, prefixed with its rank."""
    result = Check(prop)
    for rec in records:
        for f in rec.findings:
            result.fail(f"rank {rec.rank}: {f.message}", kind=f.kind, check=f.check, binding=f.binding)
    return result


#: The finding check a rank reports when the adapters' names or shapes break harness/SPEC.md.
ADAPTER_LAYOUT = "adapter_layout"


def layout_violations(prop: str, records: list[Any]) -> Optional[Check]:
    """A failing check when a rank found the implementation's adapter names or shapes off SPEC.

    Such a rank could not load the harness's adapter values, so it sent no
    tensors: every property of the example reports the violation instead
    of comparing.
    """
    found = [(rec.rank, f) for rec in records for f in rec.findings if f.check == ADAPTER_LAYOUT]
    if not found:
        return None
    result = Check(prop)
    for rank, f in found:
        result.fail(f"rank {rank}: {f.message}", kind="contract", check=ADAPTER_LAYOUT)
    return result


def fragile_dropout(*runs: Any) -> int:
    """Dropout inputs, over the given runs (lists of rank records, or single records), whose keyed
    mask a float64 rounding difference could flip (``harness.dropout.fragile_mask``)."""
    total = 0
    for run in runs:
        for rec in run if isinstance(run, list) else [run]:
            stats = getattr(getattr(rec, "extras", None), "dropout", None)
            total += getattr(stats, "fragile", 0) or 0
    return total


def compare_or_undecidable(check: Check, location: Location, stats: Any, tol: Tolerance, fragile: int) -> None:
    """``check.compare``, except that a failed comparison on an example with fragile dropout
    inputs is undecidable there, never charged: its keyed masks may differ by rounding alone."""
    if fragile and not stats.passed:
        check.note(location.describe(), "undecidable",
                   f"{location.describe()}: {stats.reason}; not charged: {fragile} dropout input element(s) lie within "
                   "2**-40 of max|x| of a keyed-mask cell boundary (harness.dropout), where a float64 rounding "
                   "difference between layouts can flip a mask")
        return
    check.compare(location, stats, tol)


class Numeric:
    """Compares the implementation's tensors with the reference's, the right way for the case's dtypes.

    float32/float64: a fixed normwise tolerance (``harness.compare.tolerance_for``).
    16-bit model or adapters: the error against a float64 reference on the
    same exact values, bounded by a multiple of the single-device 16-bit
    reference's own error (``harness.compare.compare_low_precision``); that
    needs the ``reference64`` run, made only for such cases.
    """

    def __init__(self, ev: Any) -> None:
        from harness.compare import is_low_precision, low_precision_eps, tolerance_for

        case = ev.case
        self.case = case
        self.reference = ev.reference
        self.low = is_low_precision(case.lora_dtype, case.model_dtype)
        self.exact = ev.reference64 if self.low else None
        self.eps = low_precision_eps(case.lora_dtype, case.model_dtype) if self.low else 0.0
        self.tol = tolerance_for(case.lora_dtype, case.model_dtype)
        dropping = case.training and float((case.lora or {}).get("dropout", 0.0) or 0.0) > 0
        self.fragile = fragile_dropout(ev.impl, self.reference) if dropping else 0

    def compare(self, check: Check, location: Location, actual: Any, pick: Any) -> None:
        """``actual`` against ``pick(reference record)`` (and ``pick(float64 record)`` for 16-bit)."""
        from harness.compare import compare_low_precision

        if self.low:
            from harness.compare import ILL_CONDITIONED, ill_conditioned

            stats, tol = compare_low_precision(actual, pick(self.reference), pick(self.exact), self.eps)
            if not stats.passed and ill_conditioned(stats):
                check.note(location.describe(), "undecidable",
                           f"{location.describe()}: {stats.reason}; not charged: the single-device 16-bit run's own "
                           f"error is {stats.baseline_abs / stats.ref_max:.0%} of the largest value (at least "
                           f"{ILL_CONDITIONED:.0%}: mostly rounding noise in 16 bits, where a sharded run lands anywhere)")
                return
        else:
            tol = self.tol
            stats = compare_tensors(actual, pick(self.reference), tol)
        compare_or_undecidable(check, location, stats, tol, self.fragile)

    def compare_sets(self, check: Check, quantity: str, got: dict[str, Any], field: str, ranks: tuple[int, ...]) -> None:
        """Every tensor of one replica's dict ``field`` against the reference's; the sets must agree."""
        want = _field(self.reference, field)
        if set(got) != set(want):
            missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
            check.fail(f"adapted parameters differ from the reference: missing {missing}, unexpected {extra}"
                       + pattern_hint(self.case.lora, missing + extra), check="adapted_set")
            return
        for pname in sorted(got):
            self.compare(check, Location(quantity, pname, ranks), got[pname], lambda rec, p=pname: _field(rec, field).get(p))
