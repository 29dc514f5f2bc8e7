"""init_follows_distribution and harness.stats: the KS test is calibrated and powerful, the property catches wrong draws.

The statistics tests use fixed seeds, so what they assert (a p-value above
or below the rate, a D near its expected value) is not luck; the property
tests feed the harness's own implementations (which must pass) and two
wrong ones (which must fail with a shrunk example naming matrix and method).
"""

import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import settings

from harness.families.gpt.case import GPTCase
from harness.driver import check_property
from harness.layouts import ParallelLayout
from harness.families.gpt.model import GPTShape
from harness.properties.init_distribution import ALPHA, check, spec_distribution
from harness.evidence import InitExtras, ZeroForward
from harness.results import Verdict
from harness.evidence import Partitioned, RankRecord
from harness.stats import (
    kolmogorov_sf,
    ks_critical_value,
    ks_false_alarm_bound,
    ks_power_lower_bound,
    ks_pvalue,
    ks_statistic,
    ks_test,
    standard_cdf,
)

TP1 = ParallelLayout()
TP2 = ParallelLayout(tp=2)
SEED = 20261201
SHRINK = 8
N = 16384  # the smallest adapter matrix of the init run: 128 x 128


def _phi(z):
    return 0.5 * math.erfc(-z / math.sqrt(2.0))


# ------------------------------------------------------------------ harness.stats


def test_kolmogorov_tail_matches_the_tabulated_quantiles():
    # P(K > x) at the classical 5%, 1% and 0.1% points of the Kolmogorov distribution.
    assert kolmogorov_sf(1.3581) == pytest.approx(0.05, abs=2e-4)
    assert kolmogorov_sf(1.6276) == pytest.approx(0.01, abs=1e-4)
    assert kolmogorov_sf(1.9495) == pytest.approx(0.001, abs=2e-5)
    # The two series agree where one hands over to the other, and the tail is 2 exp(-2x^2).
    assert kolmogorov_sf(1.1799999) == pytest.approx(kolmogorov_sf(1.18), rel=1e-6)
    assert kolmogorov_sf(3.0) == pytest.approx(2 * math.exp(-18), rel=1e-6)
    assert kolmogorov_sf(0.0) == 1.0 and kolmogorov_sf(0.2) == pytest.approx(1.0, abs=1e-12)
    # The rate the property uses: D_crit = 2.69 / (sqrt(n) + 0.12 + 0.11/sqrt(n)).
    assert ks_critical_value(N, ALPHA) == pytest.approx(0.02102, abs=1e-5)
    assert ks_pvalue(ks_critical_value(N, ALPHA), N) == pytest.approx(ALPHA, rel=1e-6)
    # The rate holds for finite n too (DKW-Massart), not just asymptotically.
    assert ks_false_alarm_bound(N, ALPHA) < 1.03e-6 and ks_false_alarm_bound(N // 2, ALPHA) < 1.04e-6


def test_ks_statistic_of_a_tiny_sample_by_hand():
    # Against U(-1, 1): the CDF at -0.5, 0, 0.5 is 0.25, 0.5, 0.75; F_n steps 1/3, 2/3, 1.
    d = ks_statistic([0.5, -0.5, 0.0], standard_cdf("uniform"))
    assert d == pytest.approx(0.25)


@pytest.mark.parametrize("family", ["normal", "uniform"])
def test_ks_accepts_the_right_distribution_at_the_stated_rate(family):
    """200 fixed-seed samples of the right law: p-values look uniform, none near the 1e-6 rate."""
    rng = np.random.default_rng(7)
    scale = 0.0884
    ps = []
    for _ in range(200):
        x = rng.normal(0, scale, 4096) if family == "normal" else rng.uniform(-scale, scale, 4096)
        ps.append(ks_test(x, family, scale).p)
    ps = np.array(ps)
    assert ps.min() > 1e-4  # nothing near ALPHA = 1e-6
    assert 4 <= (ps < 0.05).sum() <= 18  # 10 expected
    assert 0.4 < np.median(ps) < 0.6


def test_ks_accepts_torch_nn_init_for_each_spec_method():
    """SPEC's formulas are torch.nn.init's: its own draws pass the property's test (fixed seeds)."""
    draws = {
        "xavier": lambda w, g: torch.nn.init.xavier_normal_(w, generator=g),
        "xavier_uniform": lambda w, g: torch.nn.init.xavier_uniform_(w, generator=g),
        "kaiming": lambda w, g: torch.nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=g),
        "normal": lambda w, g: torch.nn.init.normal_(w, 0.0, 0.2, generator=g),
    }
    for seed in (0, 1, 2):
        for out_f, in_f in ((128, 128), (256, 128), (128, 256)):
            for method, draw in draws.items():
                w = draw(torch.empty(out_f, in_f), torch.Generator().manual_seed(seed))
                family, scale = spec_distribution(method, in_f, out_f)
                result = ks_test(w, family, scale)
                assert result.p > 0.1, (seed, out_f, in_f, method, result)
    # The closed forms, against torch's own gain and fan arithmetic.
    gain = torch.nn.init.calculate_gain("leaky_relu", math.sqrt(5))
    assert spec_distribution("kaiming", 100, 7) == ("uniform", pytest.approx(math.sqrt(3) * gain / 10))
    assert spec_distribution("kaiming", 100, 7)[1] == pytest.approx(1 / 10)
    assert spec_distribution("xavier", 100, 28) == ("normal", pytest.approx(math.sqrt(2 / 128)))
    assert spec_distribution("xavier_uniform", 100, 28) == ("uniform", pytest.approx(math.sqrt(6 / 128)))
    assert spec_distribution("normal", 1, 1) == ("normal", 0.2) and spec_distribution("zero", 3, 4) is None


def test_ks_rejects_the_shards_fans_and_the_wrong_family_at_the_sizes_used():
    rng = np.random.default_rng(11)
    std = math.sqrt(2 / 256)  # Xavier, full fans 128 + 128
    shard_std = math.sqrt(2 / 192)  # the same matrix's shard at TP=2: variance x 4/3
    # Fans on the shard, normal family: CDF gap 0.0347 > D_crit 0.0210.
    r = ks_test(rng.normal(0, shard_std, N), "normal", std)
    assert r.p < ALPHA and r.d == pytest.approx(0.0347, abs=0.008) and r.sample_std == pytest.approx(shard_std, rel=0.02)
    # Uniform family (xavier_uniform, kaiming): gap 0.067.
    b, shard_b = math.sqrt(3) * std, math.sqrt(3) * shard_std
    r = ks_test(rng.uniform(-shard_b, shard_b, N), "uniform", b)
    assert r.p < 1e-40 and r.d == pytest.approx(0.067, abs=0.008)
    # Kaiming on a row-parallel shard: bound off by sqrt(2), gap 0.146.
    r = ks_test(rng.uniform(-b * math.sqrt(2), b * math.sqrt(2), N), "uniform", b)
    assert r.p < 1e-200 and r.d == pytest.approx(0.146, abs=0.008)
    # Wrong family, right std (xavier drawn uniform): gap 0.0572, and the kurtosis says why.
    r = ks_test(rng.uniform(-b, b, N), "normal", std)
    assert r.p < 1e-20 and r.d == pytest.approx(0.0572, abs=0.008)
    assert r.sample_std == pytest.approx(std, rel=0.02) and r.sample_kurtosis == pytest.approx(1.8, abs=0.05)
    assert r.expected_kurtosis == 3.0


def test_power_stated_in_the_property_docstring():
    """The lower bounds the docstring quotes, and a simulation of the hardest case (all rejected)."""
    zs = np.linspace(0.01, 4, 40000)
    rho = math.sqrt(4 / 3)
    gaps = [_phi(z / rho) - _phi(z) for z in zs]
    z = zs[int(np.argmin(gaps))]
    assert min(gaps) == pytest.approx(-0.0347, abs=2e-4)
    assert ks_power_lower_bound(N, ALPHA, _phi(z / rho), _phi(z)) > 1 - 3e-6
    # Duplicated shards: 8192 distinct values, tested as 16384.
    crit = ks_critical_value(N, ALPHA)
    g, f = _phi(z / rho), _phi(z)
    sd = math.sqrt(g * (1 - g) / 8192)
    assert _phi((f + crit - g) / sd) - _phi((f - crit - g) / sd) < 6e-4
    rng = np.random.default_rng(3)
    assert all(ks_test(rng.normal(0, rho, N), "normal", 1.0).p < ALPHA for _ in range(40))


# ------------------------------------------------------------------ the check, on hand-made records


def _record(rank, adapters, tp=1, zero_forward=None):
    parts = {p: Partitioned(p.split(".adapter.")[0], None, False, tuple(t.shape)) for p, t in adapters.items()}
    extras = InitExtras(init_shape={}, dim=128, targets="case", zero_forward=zero_forward)
    return RankRecord(rank=rank, tp_rank=0, tp_size=tp, dp_rank=0, output=None, input_grad=None, adapter_grads={},
                      initial_adapters=adapters, partitions=parts, extras=extras)


def _ev(lora, adapters, zero_forward=None):
    case = GPTCase(shape=GPTShape(num_layers=1), lora=lora, seed=1, layout=TP1)
    return SimpleNamespace(case=case, init=[_record(0, adapters, zero_forward=zero_forward)])


def test_check_reports_a_non_zero_zero_init_and_a_changed_forward():
    gen = torch.Generator().manual_seed(0)
    qkv = "decoder.layers.0.self_attention.linear_qkv.adapter"
    a = torch.nn.init.xavier_normal_(torch.empty(128, 128, dtype=torch.float64), generator=gen)
    b = torch.zeros(256, 128, dtype=torch.float64)
    lora = dict(lora_A_init_method="xavier", lora_B_init_method="zero")
    assert check(_ev(lora, {f"{qkv}.linear_in.weight": a, f"{qkv}.linear_out.weight": b},
                     ZeroForward(equal=True, max_abs=0.0))).passed
    b[3, 4] = 1e-3
    result = check(_ev(lora, {f"{qkv}.linear_in.weight": a, f"{qkv}.linear_out.weight": b},
                       ZeroForward(equal=False, max_abs=2e-5)))
    messages = [f.message for f in result.findings]
    assert not result.passed and len(messages) == 2
    assert any("logits differ from the base model's at step 0" in m for m in messages)
    assert any(m.startswith("B of decoder.layers.0.self_attention.linear_qkv (zero,") and "1 of 32768 entries non-zero" in m
               for m in messages)


# ------------------------------------------------------------------ the property, through the driver

SEARCH = settings(max_examples=40, database=None, deadline=None)


@pytest.fixture
def tp2(max_tp):
    if max_tp < 2:
        pytest.skip("needs --tp 2 or more")
    return TP2


def _passes(impl, layout, examples=4, **kw):
    outcome = check_property("init_follows_distribution", layout, impl, settings=settings(SEARCH, max_examples=examples),
                             seed=SEED, **kw, designed=False)
    assert outcome.passed, outcome.error
    assert outcome.examples == examples
    return outcome


def _caught(impl, layout):
    outcome = check_property("init_follows_distribution", layout, impl, settings=SEARCH, seed=SEED, shrink_budget=SHRINK, designed=False)
    assert not outcome.passed and outcome.verdict is Verdict.CONTRACT, f"{impl} not caught at {layout}"
    assert re.search(r"Falsifying example|Failing test case", outcome.falsifying_example)
    case = outcome.minimal_case
    assert case is not None and case.impl == impl and case.layout == layout
    return outcome


def test_the_harness_implementations_pass_at_tp1():
    _passes("lora.megatron", TP1)
    _passes("lora.reference", TP1)  # single-device: it refuses TP > 1 by design


def test_lora_megatron_passes_at_tp2(tp2):
    _passes("lora.megatron", tp2)
    # The init run itself: rank 128 on the hidden-128 model, every matrix >= 16384 entries,
    # and with B zero the adapted logits equal the base model's on every rank.
    from harness.properties._gather import replicas
    from harness.runs import Evidence, Executor

    layout = ParallelLayout(tp=2, sp=True)
    lora = dict(target_modules=[], exclude_modules=["linear_proj"], dim=2, alpha=8,
                lora_A_init_method="kaiming", lora_B_init_method="zero")
    case = GPTCase(shape=GPTShape(num_layers=2, gated_linear_unit=True), lora=lora, seed=9, layout=layout)
    records = Evidence(Executor(), case).init
    assert [r.extras.zero_forward for r in records] == [ZeroForward(equal=True, max_abs=0.0)] * 2
    assert records[0].extras.dim == 128 and records[0].extras.targets == "case"
    ((_, full),) = replicas(records, layout, "initial_adapters")
    assert len(full) == 2 * 4  # qkv, fc1, fc2, output_layer
    assert min(t.numel() for t in full.values()) == 16384
    assert full["decoder.layers.0.mlp.linear_fc1.adapter.linear_out.weight"].shape == (512, 128)  # gated
    # Bridge's contract, drawn over the full matrix: nothing to report either.
    _passes("tests.impls.declares_bridge", tp2, examples=3)


def test_fans_on_the_shard_is_caught_at_tp2_and_advisory_under_bridge(tp2):
    impl = "tests.wrong_impls.fans_on_shard"
    _passes(impl, TP1, examples=6)
    outcome = _caught(impl, tp2)
    assert re.search(r"\b[AB] of decoder\.layers\.0\.\S+ \((xavier|xavier_uniform|kaiming), full fans in=\d+ out=\d+\): "
                     r"n=\d+ D=\S+ p=\S+", outcome.error), outcome.error
    assert "the shard's fans" in outcome.error and "Megatron-Bridge's behaviour" in outcome.error
    from harness.contract import Capabilities

    bridge = check_property("init_follows_distribution", tp2, impl, settings=settings(SEARCH, max_examples=8),
                            seed=SEED, capabilities=Capabilities.bridge(), designed=False)
    assert bridge.passed and bridge.verdict is Verdict.ADVISORY, bridge.error


def test_a_wrong_distribution_is_caught_even_at_tp1_where_init_matches_layouts_cannot_see_it(max_tp):
    impl = "tests.wrong_impls.init_wrong_distribution"
    outcome = _caught(impl, TP1)
    case = outcome.minimal_case
    assert "xavier" in (case.lora["lora_A_init_method"], case.lora["lora_B_init_method"])
    m = re.search(r"\b([AB]) of (decoder\.layers\.0\.\S+|output_layer) \(xavier, full fans in=\d+ out=\d+\): n=\d+ D=\S+ p=\S+ "
                  r"against SPEC's N\(0, \S+\); sample std \S+, SPEC std \S+; sample kurtosis 1\.\d+, SPEC's 3 \(normal\)",
                  outcome.error)
    assert m, outcome.error
    if max_tp >= 2:
        # Drawn over the full matrix like the right implementation: the same at every layout.
        assert check_property("init_matches_layouts", TP2, impl, settings=settings(SEARCH, max_examples=4), seed=SEED, designed=False).passed
