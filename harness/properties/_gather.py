"""Put adapter shards back together per data-parallel replica, from the partition table each rank sent."""

from __future__ import annotations

from typing import Any, Optional

from harness.compare import Tolerance, compare_tensors
from harness.results import Check, Location
from harness.sharding import Partition, unshard


def replicas(records: list[Any], layout: Any, field: str) -> list[tuple[tuple[int, ...], dict[str, Optional[Any]]]]:
    """[(ranks of one TP group, {param: full tensor or None})] for the per-rank dict ``field``.

    Records whose tensors are already full (every partition replicated, as
    the MoE task sends them) are compared rank by rank.
    """
    if records and all(p.dim is None for rec in records for p in rec.partitions.values()):
        return [((rec.rank,), dict(getattr(rec, field))) for rec in records]
    out = []
    for ranks in layout.expected_groups(len(records))["tp"]:
        members = sorted((records[r] for r in ranks), key=lambda rec: rec.tp_rank)
        full: dict[str, Optional[Any]] = {}
        for pname, part in members[0].partitions.items():
            pieces = [getattr(m, field).get(pname) for m in members]
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
