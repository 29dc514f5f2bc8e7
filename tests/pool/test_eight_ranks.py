"""Eight ranks on one box (nightly): forward_matches at TP=8 and at TP=2 x EP=4 with ETP != TP, and each rank's memory.

Runs only under ``--hypothesis-profile deep`` (``tests/conftest.py``). Each
test runs a couple of examples in the 8-rank pool, then reads every rank's
memory from ``/proc`` (``RankPool.memory``), prints it, records it as a
junit property and asserts that what each rank adds to the machine (its
proportional set size, PSS: pages shared with the fork server and the other
ranks divided among their sharers) stays within 300 MiB. The resident set
(VmRSS/VmHWM) is printed and recorded too; it counts torch's and
megatron-core's pages, shared by all eight ranks, in full in every rank.
No timing assertions: ``benchmarks/bench_eight_ranks.py`` prints the times.
"""

import statistics

import pytest
from hypothesis import settings

from harness.driver import check_property
from harness.layouts import ParallelLayout
from harness.runs import Executor
from harness.settings import layout_set

pytestmark = pytest.mark.nightly

PER_RANK_LIMIT_MIB = 300.0

# (family, layout): TP=8 dense; TP=2 x EP=4 MoE with ETP=1 in a world of 8
# (dense data parallel 4, expert data parallel 2), from the layout set of --tp 2 --ep 4.
CASES = [
    ("gpt", ParallelLayout(tp=8)),
    ("moe", ParallelLayout(tp=2, ep=4, etp=1, sp=True, data_parallel=4)),
]


@pytest.mark.parametrize("family,world8_layout", CASES, ids=[f"{f}-{l.describe()}" for f, l in CASES])
def test_forward_matches_at_eight_ranks(family, world8_layout, record_property, capsys):
    layout = world8_layout
    if family == "moe":
        assert layout in layout_set(2, 4, "moe"), "the 8-rank MoE layout with ETP != TP left the layout set"
    else:
        assert layout in layout_set(8, 1, "gpt")
    assert layout.min_world_size == 8 and (family == "gpt" or layout.etp_size != layout.tp)
    executor = Executor()
    outcome = check_property("forward_matches", layout, "lora.megatron", family=family, executor=executor,
                             settings=settings(max_examples=2, database=None, deadline=None), seed=0)
    assert outcome.passed, outcome.error
    assert outcome.examples >= 1

    pool = executor.pool(8)
    memory = pool.memory()
    assert len(memory) == 8 and all(m.get("pss") and m.get("rss") for m in memory), memory
    pss = [m["pss"] for m in memory]
    hwm = [m.get("hwm", m["rss"]) for m in memory]
    line = (
        f"{family} {layout.describe()}: {outcome.examples} examples; per rank (MiB) "
        f"PSS max {max(pss):.0f} median {statistics.median(pss):.0f}, "
        f"peak RSS max {max(hwm):.0f} median {statistics.median(hwm):.0f}, "
        f"threads max {max(m.get('threads', 0) for m in memory)}"
    )
    with capsys.disabled():
        print("\n" + line)
    record_property("rank_pss_mib_max", round(max(pss), 1))
    record_property("rank_pss_mib_median", round(statistics.median(pss), 1))
    record_property("rank_peak_rss_mib_max", round(max(hwm), 1))
    assert max(pss) <= PER_RANK_LIMIT_MIB, line
