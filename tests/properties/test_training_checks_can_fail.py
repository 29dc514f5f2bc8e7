"""Training-mode facts a single forward hides, and the checks that see them fail when they should.

Dropout (value-keyed masks, eval identity, replicated masks), gradient
accumulation over micro-batches, the optimizer step, and 16-bit
comparisons by error ratio. Each wrong implementation in
``tests.wrong_impls`` must be caught with a shrunk example that shows the
trigger (a dropout probability, two micro-batches, ...).
"""

import math

import pytest
import torch

from harness.compare import LOW_PRECISION_FACTOR, LOW_PRECISION_FLOOR, compare_low_precision
from harness.dropout import capture_dropout, fragile_mask, keyed_dropout, keyed_mask
from harness.results import Verdict
from tests.properties.test_properties_can_fail import TP1, TP2, _expect_failure, _expect_pass


# ---------------------------------------------------------------- units


def test_keyed_mask_depends_on_the_value_only():
    x = torch.randn(64, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    keep = keyed_mask(x, 0.5)
    # The same values elsewhere (a shard, a permutation) get the same decisions.
    perm = torch.randperm(x.numel(), generator=torch.Generator().manual_seed(4))
    assert torch.equal(keyed_mask(x.flatten()[perm], 0.5), keep.flatten()[perm])
    assert torch.equal(keyed_mask(x[:, 16:], 0.5), keep[:, 16:])
    # 1 ulp of float64, or a summation-order difference (1e-14 of the value), does not matter.
    assert torch.equal(keyed_mask(torch.nextafter(x, torch.full_like(x, math.inf)), 0.5), keep)
    assert torch.equal(keyed_mask(x * (1 + 1e-14), 0.5), keep)
    assert keyed_mask(x, 0.0).all()


def test_a_decision_a_rounding_difference_could_flip_is_flagged_fragile():
    x = torch.randn(200_000, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    fragile = fragile_mask(x)
    # Rare by design: a few per million elements of a Gaussian.
    assert 0 < int(fragile.sum()) < 20
    # A value just below a cell boundary and one just above decide apart; both are flagged.
    edge = torch.tensor([1.0, 0.75, -1.5, 3.0], dtype=torch.float64)
    below = torch.nextafter(edge, torch.zeros_like(edge))
    assert fragile_mask(edge).all() and fragile_mask(below).all()
    apart = torch.cat([edge, below]).repeat(64)
    keys = [keyed_mask(apart, p) for p in (0.3, 0.5, 0.7)]
    assert any(not torch.equal(k[:4], k[4:8]) for k in keys)
    # A summation-order difference flips no decision of an element that is not flagged.
    for rel in (1e-15, -1e-14, 3e-14):
        assert not ((keyed_mask(x, 0.5) != keyed_mask(x * (1 + rel), 0.5)) & ~fragile).any()
    # Exact zeros decide alike everywhere and are never fragile.
    assert not fragile_mask(torch.zeros(8, dtype=torch.float64)).any()


def test_a_failed_comparison_on_fragile_dropout_is_undecidable_never_charged():
    from harness.compare import FLOAT64, compare_tensors
    from harness.properties._gather import compare_or_undecidable
    from harness.results import Check, Location

    stats = compare_tensors(torch.ones(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64), FLOAT64)
    charged, spared = Check("forward_matches"), Check("forward_matches")
    compare_or_undecidable(charged, Location("output", None, (0,)), stats, FLOAT64, fragile=0)
    compare_or_undecidable(spared, Location("output", None, (0,)), stats, FLOAT64, fragile=2)
    assert charged.verdict is Verdict.NUMERIC
    assert spared.verdict is Verdict.PASS and [n.status for n in spared.notes] == ["undecidable"]
    assert "2 dropout input element(s)" in spared.notes[0].message


def test_keyed_mask_drops_at_the_probability():
    x = torch.randn(200_000, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    for p in (0.1, 0.5, 0.9):
        rate = 1.0 - keyed_mask(x, p).double().mean().item()
        # Binomial standard deviation at n=2e5 is at most 0.0012: 0.006 is 5 sigma.
        assert abs(rate - p) < 0.006, (p, rate)


def test_keyed_dropout_replaces_functional_dropout_and_counts():
    x = torch.randn(1000, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    model = torch.nn.Dropout(0.5)
    with keyed_dropout(model) as log:
        out = model(x)
        model.eval()
        same = model(x)
        eval_drop = torch.nn.functional.dropout(x, 0.5, training=True)
    keep = keyed_mask(x, 0.5)
    assert torch.equal(out, torch.where(keep, x * 2.0, torch.zeros_like(x)))
    assert torch.equal(same, x)
    assert log.calls == 2 and log.eval_calls == 1 and log.dropped == 2 * int((~keep).sum())
    # Restored afterwards: the real dropout is random again.
    torch.manual_seed(0)
    first = torch.dropout(x, 0.5, True)
    assert not torch.equal(first, out) and not torch.equal(torch.dropout(x, 0.5, True), first)


def test_keyed_dropout_covers_every_way_to_call_dropout():
    from torch.nn.functional import dropout as bound_before  # an implementation's own import

    x = torch.randn(300, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    want = torch.where(keyed_mask(x, 0.25), x / 0.75, torch.zeros_like(x))
    with keyed_dropout() as log:
        outs = [bound_before(x, 0.25), torch.nn.Dropout(0.25)(x), torch.dropout(x, 0.25, True),
                torch.nn.functional.dropout(x.clone(), 0.25, inplace=True)]
    for out in outs:
        assert torch.equal(out, want)
    assert log.calls == 4


def test_capture_dropout_records_the_real_mask():
    torch.manual_seed(0)
    x = torch.randn(500, dtype=torch.float64) + 10.0  # no zeros in the input
    with capture_dropout() as log:
        out = torch.nn.functional.dropout(x, 0.3, training=True)
    assert log.calls == 1 and log.dropped == int((out == 0).sum()) > 0
    (shape, _, _), = log.records
    assert shape == (500,)


def test_low_precision_bound_is_relative_to_the_single_device_error():
    exact = torch.tensor([1.0, -2.0, 4.0], dtype=torch.float64)
    ref = exact + torch.tensor([0.0, 0.01, 0.0], dtype=torch.float64)  # single-device error 0.01
    eps = 2.0**-7
    bound = LOW_PRECISION_FACTOR * 0.01 + LOW_PRECISION_FLOOR * eps * 4.0
    ok, tol = compare_low_precision(exact + 0.99 * bound, ref, exact, eps)
    assert ok.passed and tol.atol == pytest.approx(bound) and ok.baseline_abs == pytest.approx(0.01)
    bad, _ = compare_low_precision(exact + 1.01 * bound, ref, exact, eps)
    assert not bad.passed and "single-device 16-bit error 0.01" in bad.reason
    missing, _ = compare_low_precision(None, ref, exact, eps)
    assert not missing.passed
    # A reference that overflowed float16 measures nothing: not compared, not failed.
    overflowed, _ = compare_low_precision(exact, ref * math.inf, exact, eps)
    assert overflowed.passed and "overflowed" in overflowed.reason


# ---------------------------------------------------------------- can fail


@pytest.fixture(autouse=True)
def _needs_tp2(max_tp):
    if max_tp < 2:
        pytest.skip("needs --tp 2 or more")


def test_dropout_in_eval_is_caught():
    outcome = _expect_failure("dropout_follows_spec", "tests.wrong_impls.dropout_in_eval", TP1)
    case = outcome.minimal_case
    assert not case.training and case.lora["dropout"] > 0
    assert "eval mode" in outcome.error and outcome.verdict is Verdict.CONTRACT


def test_dropout_on_the_base_path_is_caught_by_the_forward_comparison():
    outcome = _expect_failure("forward_matches", "tests.wrong_impls.dropout_on_base_path", TP2)
    case = outcome.minimal_case
    assert case.training and case.lora["dropout"] > 0 and outcome.verdict is Verdict.NUMERIC


def test_replicated_tensor_dropped_differently_per_rank_is_caught():
    # The value-keyed masks hide the RNG stream from the equivalence checks ...
    _expect_pass("forward_matches", "tests.wrong_impls.dropout_mask_per_rank", TP2)
    # ... so the real masks are captured and compared across TP ranks.
    outcome = _expect_failure("dropout_follows_spec", "tests.wrong_impls.dropout_mask_per_rank", TP2)
    assert "same on every TP rank" in outcome.error
    assert outcome.minimal_case.training and outcome.minimal_case.lora["dropout"] > 0


def test_gradient_assigned_instead_of_accumulated_is_caught():
    outcome = _expect_failure("backward_matches", "tests.wrong_impls.grad_assigned", TP2)
    case = outcome.minimal_case
    assert case.micro_batches == 2 and case.training
    assert "gradient of" in outcome.error or "after one SGD step" in outcome.error
