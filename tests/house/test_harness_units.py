"""Pure-Python pieces of the harness: sharding, comparison, shapes, strategies (no processes)."""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from harness.compare import FLOAT32, FLOAT64, Tolerance, compare_tensors, tolerance_for
from harness.layouts import ParallelLayout
from harness.families.gpt.model import GPTShape, ShapeError
from harness.sharding import Partition, seeded_tensor, shard, unshard
from harness.strategies import lora_configs
from harness.families.gpt.strategy import gpt_cases, gpt_shapes
from harness.runs import RUN_KINDS


@settings(max_examples=200, deadline=None)
@given(
    size=st.sampled_from([1, 2, 4]),
    rows=st.integers(1, 3),
    cols=st.integers(1, 3),
    dim=st.sampled_from([0, 1]),
    gated=st.booleans(),
)
def test_unshard_inverts_shard(size, rows, cols, dim, gated):
    shape = [rows * size * 2, cols * size * 2]
    full = torch.arange(math.prod(shape), dtype=torch.float64).reshape(shape)
    part = Partition(dim, gated=gated and dim == 0)
    pieces = [shard(full, part, r, size) for r in range(size)]
    assert all(p.shape[dim] == shape[dim] // size for p in pieces)
    assert torch.equal(unshard(pieces, part), full)


def test_gated_shard_is_gate_slice_then_up_slice():
    full = torch.arange(8.0).reshape(8, 1)  # gate rows 0..3, up rows 4..7
    part = Partition(0, gated=True)
    assert shard(full, part, 0, 2).flatten().tolist() == [0, 1, 4, 5]
    assert shard(full, part, 1, 2).flatten().tolist() == [2, 3, 6, 7]
    # A contiguous split would be a different (wrong) layout.
    assert shard(full, Partition(0), 1, 2).flatten().tolist() == [4, 5, 6, 7]


def test_shard_rejects_indivisible():
    with pytest.raises(ValueError, match=r"cannot split a tensor of shape \(3, 2\)"):
        shard(torch.zeros(3, 2), Partition(0), 0, 2)


def test_seeded_tensor_depends_only_on_seed_name_shape():
    a = seeded_tensor(1, "x", (2, 3))
    assert torch.equal(a, seeded_tensor(1, "x", (2, 3)))
    assert not torch.equal(a, seeded_tensor(2, "x", (2, 3)))
    assert not torch.equal(a, seeded_tensor(1, "y", (2, 3)))


def test_compare_tensors_bound_and_statistics():
    ref = torch.tensor([1.0, -2.0, 4.0], dtype=torch.float64)
    ok = compare_tensors(ref + 1e-4, ref, Tolerance(rtol=1e-4, atol=1e-6))
    assert ok.passed and ok.ref_max == 4.0 and ok.max_abs == pytest.approx(1e-4)
    bad = compare_tensors(ref * torch.tensor([1.0, 1.0, 1.5]), ref, FLOAT32)
    assert not bad.passed and bad.worst_index == (2,) and bad.max_rel == pytest.approx(0.5)
    assert "max|diff|=2 at (2,)" in bad.reason


@pytest.mark.parametrize(
    "actual, expected, reason",
    [
        (None, torch.ones(2), "actual is None"),
        (torch.ones(3), torch.ones(2), "shape (3,) != expected (2,)"),
        (torch.tensor([float("nan"), 1.0]), torch.ones(2), "non-finite"),
    ],
)
def test_compare_tensors_never_passes_silently(actual, expected, reason):
    stats = compare_tensors(actual, expected, FLOAT32)
    assert not stats.passed and reason in stats.reason


def test_tolerance_follows_the_least_precise_dtype():
    assert tolerance_for(None, "float64") == FLOAT64
    assert tolerance_for("float32", "float64") == FLOAT32
    assert tolerance_for(None, "float32") == FLOAT32
    assert tolerance_for("bfloat16", "float64").rtol == 8 * torch.finfo(torch.bfloat16).eps


@pytest.mark.parametrize(
    "shape, tp, message",
    [
        (GPTShape(num_attention_heads=4, num_query_groups=2), 4, "num_query_groups=2 must be divisible by TP=4"),
        (GPTShape(hidden_size=30, num_attention_heads=4), 1, "hidden_size=30 must be a multiple of num_attention_heads=4"),
        (GPTShape(vocab_size=63), 2, "vocab_size=63 must be divisible by TP=2"),
    ],
)
def test_shape_errors_name_field_value_and_rule(shape, tp, message):
    with pytest.raises(ShapeError, match=message.replace("(", r"\(")):
        shape.check(tp)


@settings(max_examples=300, deadline=None)
@given(data=st.data(), tp=st.sampled_from([1, 2, 4]))
def test_strategies_only_draw_valid_examples(data, tp):
    shape = data.draw(gpt_shapes(tp))
    shape.check(tp)
    cfg = data.draw(lora_configs(tp))
    assert cfg["dim"] % tp == 0
    assert bool(cfg["target_modules"]) != bool(cfg["exclude_modules"])
    case = data.draw(gpt_cases(ParallelLayout(tp=tp)))
    assert case.layout == ParallelLayout(tp=tp)
    assert isinstance(case.model_dtype, torch.dtype)
    # Training-mode dropout only where value-keyed masks decide alike on
    # every layout: float64 model and adapters.
    if case.training and case.lora["dropout"] > 0:
        assert case.model_dtype == torch.float64 and case.lora_dtype in (None, torch.float64)
    assert case.micro_batches in (1, 2) and (case.training or case.micro_batches == 1)


@settings(max_examples=100, deadline=None)
@given(data=st.data(), tp=st.sampled_from([1, 2]))
def test_cases_round_trip_through_plain_json(data, tp):
    import json

    from harness.cases import case_from_json

    case = data.draw(gpt_cases(ParallelLayout(tp=tp), "some.impl"))
    text = json.dumps(case.to_json())
    back = case_from_json(json.loads(text))
    assert back == case and back.to_json() == case.to_json()


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_strategies_draw_only_inside_the_capabilities(data):
    from harness.contract import Capabilities

    caps = Capabilities.bridge()
    case = data.draw(gpt_cases(ParallelLayout(tp=2), "x", caps))
    assert case.lora["lora_A_init_method"] in caps.init_methods and case.lora["lora_B_init_method"] in caps.init_methods
    assert case.lora_dtype is None and case.contract == "bridge"


def test_capabilities_validate_and_say_what_they_skip():
    from harness.contract import Capabilities

    with pytest.raises(ValueError, match="Capabilities.contract='loose'"):
        Capabilities(contract="loose")
    with pytest.raises(ValueError, match="init_methods"):
        Capabilities(init_methods=("he",))
    with pytest.raises(ValueError, match="unknown keys \\['colour'\\]"):
        Capabilities.from_mapping({"colour": 1})
    skipped = " ".join(Capabilities.bridge(vlm=False).skipped())
    assert "xavier_uniform" in skipped and "VLMLoRA" in skipped and "advisory" in skipped
    assert Capabilities().skipped() == []


def test_regression_store_saves_once_and_replays_by_property_and_layout(tmp_path):
    from harness.families.gpt.case import GPTCase
    from harness.regressions import RegressionStore

    store = RegressionStore(tmp_path / "reg")
    case = GPTCase(shape=GPTShape(), lora={"dim": 2}, seed=4, layout=ParallelLayout(tp=2), impl="a.b")
    first = store.save("forward_matches", case, "numeric", "output on rank 1: too far\nmore")
    assert store.save("forward_matches", case, "numeric", "again") == first
    assert [c for _, c in store.cases("forward_matches", "tp2-ep1-etp2-pp1")] == [case]
    assert store.cases("backward_matches", "tp2-ep1-etp2-pp1") == []
    assert store.cases("forward_matches", "tp1-ep1-etp1-pp1") == []


def test_the_registry_finds_every_property_module():
    import pkgutil

    import harness.properties as props

    modules = [m.name for m in pkgutil.iter_modules(props.__path__) if not m.name.startswith("_")]
    registered = props.registry()
    # Every module registers at least one property (training.py registers two, from one run).
    homes = {p.check.__module__.rsplit(".", 1)[-1] for p in registered.values()}
    assert homes == set(modules) and len(registered) >= len(modules) >= 5
    for p in registered.values():
        assert p.needs and set(p.needs) <= set(RUN_KINDS)
        assert p.kind in ("numeric", "contract") and p.doc


def test_layout_set_refuses_what_it_would_round():
    from harness.settings import layout_set

    with pytest.raises(ValueError, match="--tp 3: .* use 2 or 4"):
        layout_set(3)
    with pytest.raises(ValueError, match="--ep 0"):
        layout_set(2, 0)
    assert [str(l) for l in layout_set(2, 2)] == [
        "tp1-ep1-etp1-pp1", "tp1-ep2-etp1-pp1", "tp2-ep1-etp2-pp1", "tp2-ep1-etp2-pp1-sp", "tp2-ep2-etp2-pp1-sp",
    ]


def test_coverage_counts_what_distinct_examples_exercise():
    from harness.results import ExampleRecord, PropertyOutcome, Verdict, case_features, coverage

    a2a = {"lora": {"a2a_experimental": True, "dropout": 0.1}, "training": True, "model_dtype": "bfloat16", "micro_batches": 2}
    plain = {"lora": {"dropout": 0.5}, "training": False, "model_dtype": "float64", "lora_dtype": None}
    assert case_features(a2a) == ["16-bit", "a2a", "training dropout", "2+ micro-batches"]
    assert case_features(plain) == ["eval dropout", "inference"]
    recs = [ExampleRecord("p", "tp2-sp", c, Verdict.PASS, 0.0) for c in (a2a, plain)]
    # Two properties on the same two examples: counted once each.
    outcomes = [PropertyOutcome(prop, "tp2-sp", "impl", records=list(recs)) for prop in ("forward_matches", "merge_matches")]
    assert coverage(outcomes) == {("gpt", "tp2-sp"): {
        "examples": 2, "16-bit": 1, "a2a": 1, "training dropout": 1, "2+ micro-batches": 1, "eval dropout": 1, "inference": 1}}


def test_a_rank_error_is_a_contract_violation_by_its_type_not_its_name():
    """A ``harness.errors.SpecViolation`` raised on a rank makes the example a contract failure; an
    implementation's own exception that happens to share the name is a crash."""
    from harness.driver import _fault_verdict
    from harness.errors import RankTaskError, SpecViolation
    from harness.pool.messages import RemoteError
    from harness.results import Verdict

    def remote(exc: BaseException) -> RemoteError:
        try:
            raise exc
        except BaseException as raised:  # noqa: BLE001 - what a rank does with any exception
            return RemoteError.from_exception(raised)

    class NotOurs(AssertionError):
        pass

    NotOurs.__name__ = "SpecViolation"
    ours, theirs = remote(SpecViolation("lora_A has shape (4, 8)")), remote(NotOurs("lora_A has shape (4, 8)"))
    assert ours.exc_type == theirs.exc_type == "SpecViolation"
    assert ours.contract and not theirs.contract
    assert _fault_verdict(RankTaskError("report", {0: ours, 1: ours})) is Verdict.CONTRACT
    assert _fault_verdict(RankTaskError("report", {0: ours, 1: theirs})) is Verdict.CRASH
    exc_type, message, _ = theirs  # still unpacks as (type name, message, traceback)
    assert (exc_type, message) == ("SpecViolation", "lora_A has shape (4, 8)")


def test_a_16_bit_comparison_of_mostly_rounding_noise_is_undecidable_not_charged():
    """Deep seed 1302: bf16 gradients at tp2 whose single-device errors were 5% and 10% of their largest entries;
    the correct sharded run's were 9 and 8.6 times those. Such a comparison decides nothing; one whose single-device error is small
    still fails a wrong value."""
    import torch

    from harness.compare import compare_low_precision, ill_conditioned
    from harness.properties._gather import Numeric
    from harness.results import Check, Location

    exact = torch.tensor([10.0, 0.5])
    noisy, clean = torch.tensor([9.0, 0.5]), torch.tensor([9.99, 0.5])
    wrong = torch.tensor([0.0, 0.5])
    eps = torch.finfo(torch.bfloat16).eps
    stats, _ = compare_low_precision(wrong, noisy, exact, eps)
    assert not stats.passed and ill_conditioned(stats)
    stats, _ = compare_low_precision(wrong, clean, exact, eps)
    assert not stats.passed and not ill_conditioned(stats)

    numeric = Numeric.__new__(Numeric)
    numeric.low, numeric.eps, numeric.fragile = True, eps, 0
    for reference, verdict_failing in ((noisy, False), (clean, True)):
        numeric.reference, numeric.exact = reference, exact
        check = Check("forward_matches")
        numeric.compare(check, Location("output", None, (0,)), wrong, lambda rec: rec)
        assert check.verdict.failing is verdict_failing
        assert bool(check.notes) is not verdict_failing
