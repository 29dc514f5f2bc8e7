"""The properties: a sharded LoRA computes what the single-device reference computes.

Shared by the pytest suite and the ``lora-harness`` CLI. For one drawn
``GPTCase`` the ``Verifier`` runs the implementation under test at the
case's layout on a pool of that layout's world size, and ``lora.reference``
on the same full weights in a world of size 1; then each property compares
one aspect:

* ``forward_matches``: the logits on every rank equal the reference logits;
* ``backward_matches``: the input gradient on every rank, and every adapter
  parameter's gradient (shards put back together per SPEC.md's TP table,
  for each data-parallel replica) equal the reference gradients;
* ``init_matches_layouts``: the adapters as the implementation initialised
  them, gathered, equal what the same implementation draws at TP=1 for the
  same seed;
* ``adapters_follow_spec``: base parameters frozen, adapter parameters
  trainable and in lora_dtype, logits in the base dtype, and applying the
  LoRA a second time changes nothing;
* ``errors_follow_spec``: bad input (both target and exclude patterns, an
  unknown init method, a pattern selecting a module with no adapter, a rank
  TP cannot split, a pattern matching nothing) gives SPEC's error type or
  warning, naming the module and the value.

``check_property`` runs one property for one layout under hypothesis and
returns a ``PropertyOutcome`` carrying hypothesis's minimal falsifying
example; ``require_property`` raises instead (for pytest).
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from hypothesis import HealthCheck, given, reject, seed as hypothesis_seed, settings as hsettings

from harness.compare import ErrorStats, compare_tensors, tolerance_for
from harness.layouts import ParallelLayout
from harness.runner import RankHang
from harness.sharding import unshard
from harness.tasks import GPTCase, run_error_case, run_gpt_case

__all__ = [
    "PROPERTIES",
    "Check",
    "PropertyOutcome",
    "PropertyFailure",
    "Verifier",
    "check_property",
    "require_property",
    "REFERENCE_IMPL",
]

REFERENCE_IMPL = "lora.reference"
REFERENCE_LAYOUT = ParallelLayout()


class PropertyFailure(AssertionError):
    """A property does not hold for an example; the message says where and by how much."""


@dataclass
class Check:
    """The verdict of one property on one example, with its error statistics."""

    prop: str
    failures: list[str] = field(default_factory=list)
    stats: dict[str, ErrorStats] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.failures

    def message(self, case: GPTCase) -> str:
        head = f"{self.prop} failed for impl {case.impl} at layout {case.layout}:"
        return "\n  ".join([head, *self.failures])


class Evidence:
    """The runs one example needs, each made on first use and shared by the properties.

    ``results``: the implementation under test at the case's layout (per rank);
    ``reference``: ``lora.reference`` in a world of size 1;
    ``baseline``: the implementation under test itself at TP=1, world size 1.
    """

    def __init__(self, verifier: "Verifier", case: GPTCase) -> None:
        self.verifier = verifier
        self.case = case
        self.layout = ParallelLayout.parse(case.layout)
        self._cache: dict[str, Any] = {}

    def _get(self, key: str, make: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    @property
    def results(self) -> list[dict[str, Any]]:
        return self._get("results", lambda: self.verifier.run(self.case))

    @property
    def reference(self) -> dict[str, Any]:
        return self._get("reference", lambda: self.verifier.reference(self.case))

    @property
    def baseline(self) -> dict[str, Any]:
        return self._get("baseline", lambda: self.verifier.baseline(self.case))

    @property
    def error_results(self) -> list[dict[str, Any]]:
        return self._get("errors", lambda: self.verifier.run(self.case, task=run_error_case))


def _assemble(results: list[dict[str, Any]], layout: ParallelLayout, key: str) -> list[dict[str, Any]]:
    """Per data-parallel replica: full adapter tensors (``key``) put back together from TP shards."""
    groups = layout.expected_groups(len(results))["tp"]
    replicas = []
    for ranks in groups:
        members = sorted((results[r] for r in ranks), key=lambda res: res["tp_rank"])
        layout_info = members[0]["adapter_layout"]
        full: dict[str, Any] = {}
        for pname, (_, part, _shape) in layout_info.items():
            pieces = [m[key].get(pname) for m in members]
            full[pname] = None if any(p is None for p in pieces) else unshard(pieces, part)
        replicas.append({"ranks": ranks, "tensors": full})
    return replicas


def _compare_adapter_sets(check: Check, what: str, got: dict[str, Any], want: dict[str, Any], ranks: list[int], tol: Any) -> None:
    if set(got) != set(want):
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        check.failures.append(f"adapted parameters differ from the reference: missing {missing}, unexpected {extra}")
        return
    for pname in sorted(got):
        stats = compare_tensors(got[pname], want[pname], tol)
        check.stats[f"{pname}.{what}@ranks{ranks}"] = stats
        if not stats.passed:
            check.failures.append(f"{what} of {pname} (gathered over ranks {ranks}): {stats.reason}")


def forward_matches(ev: Evidence) -> Check:
    case, ref, results = ev.case, ev.reference, ev.results
    tol = tolerance_for(case.lora.get("lora_dtype"), case.model_dtype)
    check = Check("forward_matches")
    for res in results:
        stats = compare_tensors(res["output"], ref["output"], tol)
        check.stats[f"output@rank{res['rank']}"] = stats
        if not stats.passed:
            check.failures.append(f"logits on rank {res['rank']} (TP rank {res['tp_rank']}): {stats.reason}")
    return check


def backward_matches(ev: Evidence) -> Check:
    case, ref, results = ev.case, ev.reference, ev.results
    tol = tolerance_for(case.lora.get("lora_dtype"), case.model_dtype)
    check = Check("backward_matches")
    for res in results:
        stats = compare_tensors(res["input_grad"], ref["input_grad"], tol)
        check.stats[f"input_grad@rank{res['rank']}"] = stats
        if not stats.passed:
            check.failures.append(f"input gradient on rank {res['rank']}: {stats.reason}")
    for replica in _assemble(results, ev.layout, "adapter_grads"):
        _compare_adapter_sets(check, "gradient", replica["tensors"], ref["adapter_grads"], replica["ranks"], tol)
    return check


def init_matches_layouts(ev: Evidence) -> Check:
    """The adapters as the implementation initialised them, gathered, equal its own TP=1 init.

    SPEC: init is computed over the full matrix, so for one seed the initial
    adapter is the same at every layout (fans computed on a shard, or a
    per-rank random stream, break this).
    """
    check = Check("init_matches_layouts")
    # Initial values are drawn over the full matrix and sliced: bit-identical
    # when right, so the tightest bound applies whatever the dtypes.
    tol = tolerance_for("float64", "float64")
    want = ev.baseline["initial_adapters"]
    for replica in _assemble(ev.results, ev.layout, "initial_adapters"):
        _compare_adapter_sets(check, "initial value", replica["tensors"], want, replica["ranks"], tol)
    return check


def _rank_violations(prop: str, results: list[dict[str, Any]], key: str) -> Check:
    """A check failing with every violation each rank reported under ``key``."""
    return Check(prop, [f"rank {res['rank']}: {v}" for res in results for v in res[key]])


def adapters_follow_spec(ev: Evidence) -> Check:
    """Per rank: base frozen, adapters trainable, adapter dtype = lora_dtype, logits dtype kept, idempotent."""
    return _rank_violations("adapters_follow_spec", ev.results, "spec_violations")


def errors_follow_spec(ev: Evidence) -> Check:
    """Bad input gives SPEC's errors (type and message) and warnings, on every rank."""
    return _rank_violations("errors_follow_spec", ev.error_results, "error_violations")


PROPERTIES: dict[str, Callable[[Evidence], Check]] = {
    "forward_matches": forward_matches,
    "backward_matches": backward_matches,
    "init_matches_layouts": init_matches_layouts,
    "adapters_follow_spec": adapters_follow_spec,
    "errors_follow_spec": errors_follow_spec,
}


class Verifier:
    """Runs cases on rank pools and keeps the reference results it has computed."""

    def __init__(self, backend: str = "gloo", reference_cache_size: int = 64, timeout: Optional[float] = None) -> None:
        self.backend = backend
        self.timeout = timeout
        self._ref_cache: "collections.OrderedDict[tuple, dict[str, Any]]" = collections.OrderedDict()
        self._cache_size = reference_cache_size

    def _pool(self, world_size: int) -> Any:
        from harness.runner import get_pool

        return get_pool(
            world_size,
            self.backend,
            initializer="harness.cpu:rank_initializer",
            preload=("harness._quiet", "torch", "megatron.core", "harness.tasks"),
        )

    def _world1(self, key: tuple, case: GPTCase) -> dict[str, Any]:
        """``case`` run in a world of size 1, kept in a small LRU cache under ``key``."""
        if key in self._ref_cache:
            self._ref_cache.move_to_end(key)
        else:
            self._ref_cache[key] = self._pool(1).run(run_gpt_case, case, timeout=self.timeout)[0]
            while len(self._ref_cache) > self._cache_size:
                self._ref_cache.popitem(last=False)
        return self._ref_cache[key]

    def reference(self, case: GPTCase) -> dict[str, Any]:
        """``lora.reference`` on the same full weights at TP=1."""
        ref_case = case.with_(impl=REFERENCE_IMPL, layout=REFERENCE_LAYOUT.describe())
        return self._world1(("reference", case.reference_key()), ref_case)

    def baseline(self, case: GPTCase) -> dict[str, Any]:
        """The implementation under test itself at TP=1 in a world of size 1."""
        base_case = case.with_(layout=REFERENCE_LAYOUT.describe())
        return self._world1(("baseline", case.impl, case.reference_key()), base_case)

    def run(self, case: GPTCase, task: Callable[..., Any] = run_gpt_case) -> list[dict[str, Any]]:
        layout = ParallelLayout.parse(case.layout)
        return self._pool(layout.min_world_size).run(task, case, timeout=self.timeout)

    def check(self, prop: str, case: GPTCase) -> Check:
        if prop not in PROPERTIES:
            raise ValueError(f"unknown property {prop!r}; known: {', '.join(PROPERTIES)}")
        return PROPERTIES[prop](Evidence(self, case))


_DEFAULT_VERIFIER: Optional[Verifier] = None


def default_verifier() -> Verifier:
    global _DEFAULT_VERIFIER
    if _DEFAULT_VERIFIER is None:
        _DEFAULT_VERIFIER = Verifier()
    return _DEFAULT_VERIFIER


@dataclass
class PropertyOutcome:
    """One property at one layout for one implementation, over all drawn examples."""

    prop: str
    layout: str
    impl: str
    passed: bool
    examples: int = 0
    seconds: float = 0.0
    error: str = ""
    falsifying_example: str = ""
    # The shrunk example itself: hypothesis replays the minimal failing
    # example last, so the last case that failed is the minimal one.
    minimal_case: Optional[GPTCase] = None
    worst: dict[str, float] = field(default_factory=dict)
    exception: Optional[BaseException] = field(default=None, repr=False)

    def summary_line(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        worst = max(self.worst.values(), default=0.0)
        return f"{verdict}  {self.prop:<22} {self.layout:<18} {self.examples:>4} examples  worst rel err {worst:.2e}  {self.seconds:6.1f}s"


def check_property(
    prop: str,
    layout: ParallelLayout,
    impl: str = "lora.megatron",
    *,
    settings: Optional[hsettings] = None,
    verifier: Optional[Verifier] = None,
    seed: Optional[int] = None,
    max_hangs: int = 3,
) -> PropertyOutcome:
    """Run one property for one layout under hypothesis; never raises for a failure.

    ``settings`` defaults to the active hypothesis profile. A failure carries
    hypothesis's minimal falsifying example (shrunk) in ``falsifying_example``
    and the case itself in ``minimal_case``.

    Hangs are bounded: every hung example costs a rank timeout, and the
    shrinker may try dozens of candidates. After ``max_hangs`` hangs in one
    run, new candidates are rejected (hypothesis keeps the smallest hanging
    example found so far) and a candidate that already hung is failed again
    at once from memory, so hypothesis's final replay costs nothing.
    """
    from harness.strategies import gpt_cases

    if prop not in PROPERTIES:
        raise ValueError(f"unknown property {prop!r}; known: {', '.join(PROPERTIES)}")
    verifier = verifier or default_verifier()
    outcome = PropertyOutcome(prop=prop, layout=layout.describe(), impl=impl, passed=True)
    base = settings if settings is not None else hsettings()
    run_settings = hsettings(
        base,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        report_multiple_bugs=False,
    )

    hung: dict[str, BaseException] = {}

    @run_settings
    @given(case=gpt_cases(layout, impl))
    def _property(case: GPTCase) -> None:
        key = repr(case)
        if key in hung:
            outcome.minimal_case = case
            raise hung[key]
        if len(hung) >= max_hangs:
            reject()
        outcome.examples += 1
        try:
            result = verifier.check(prop, case)
        except RankHang as exc:
            hung[key] = exc
            outcome.minimal_case = case
            raise
        except BaseException:
            outcome.minimal_case = case
            raise
        for key, stats in result.stats.items():
            kind = key.split("@")[0]
            outcome.worst[kind] = max(outcome.worst.get(kind, 0.0), stats.max_rel)
        if not result.passed:
            outcome.minimal_case = case
            raise PropertyFailure(result.message(case))

    # Distinct database keys per property, layout and implementation, so a
    # failure recorded for one is replayed only for that one.
    _property.hypothesis.inner_test._hypothesis_internal_add_digest = f"{prop}|{layout.describe()}|{impl}".encode()
    if seed is not None:
        _property = hypothesis_seed(seed)(_property)
    start = time.monotonic()
    try:
        _property()
    except Exception as exc:  # noqa: BLE001 - every failure becomes an outcome
        outcome.passed = False
        outcome.exception = exc
        outcome.error = f"{type(exc).__name__}: {exc}"
        notes = getattr(exc, "__notes__", [])
        outcome.falsifying_example = "\n".join(n for n in notes if n)
    outcome.seconds = time.monotonic() - start
    return outcome


def require_property(prop: str, layout: ParallelLayout, impl: str = "lora.megatron", **kw: Any) -> PropertyOutcome:
    """``check_property`` that raises the failure (with hypothesis's example) for pytest."""
    outcome = check_property(prop, layout, impl, **kw)
    if not outcome.passed:
        assert outcome.exception is not None
        raise outcome.exception
    return outcome
