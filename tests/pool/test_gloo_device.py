"""One gloo device per rank (harness.gloo): every group a rank makes shares one loop thread, and computes as before."""

from harness.gloo import loop_threads, share_one_device
from harness.pool import RankPool
from tests.helpers import runner_tasks as T

GROUPS = 12


def _run(monkeypatch, device):
    if device is None:
        monkeypatch.delenv("LORA_HARNESS_GLOO_DEVICE", raising=False)
    else:
        monkeypatch.setenv("LORA_HARNESS_GLOO_DEVICE", device)
    pool = RankPool(2, timeout=60)
    try:
        return pool.run(T.gloo_groups_and_loop_threads, GROUPS)
    finally:
        pool.shutdown()


def test_the_groups_of_a_rank_share_one_loop_thread_and_sum_as_before(monkeypatch):
    shared = _run(monkeypatch, None)
    for rank, got in enumerate(shared):
        # One device for the world group and the twelve: one thread that wakes every 10 ms.
        assert got["threads"] == 1, got
        # 1 + 2 from the two ranks, and each group's own index.
        assert got["sums"] == [[3.0, 2.0 * i] for i in range(GROUPS)]
        assert got["kinds"] == ["ProcessGroupGloo"]


def test_torch_default_is_a_loop_thread_per_group(monkeypatch):
    """What the shared device avoids (and what the test above would see without it)."""
    own = _run(monkeypatch, "own")
    assert all(got["threads"] >= GROUPS + 1 for got in own), own
    assert all(got["sums"] == [[3.0, 2.0 * i] for i in range(GROUPS)] for got in own)


def test_share_one_device_is_idempotent_in_this_process():
    from torch.distributed import distributed_c10d as c10d

    before = c10d.ProcessGroupGloo
    try:
        assert share_one_device() is True
        patched = c10d.ProcessGroupGloo
        assert share_one_device() is True
        assert c10d.ProcessGroupGloo is patched
        assert issubclass(patched, before)
    finally:
        c10d.ProcessGroupGloo = before
    assert loop_threads(-1) == 0  # no such process: 0, not an error
