"""One gloo device per rank process, shared by all its process groups.

torch gives every gloo process group a device of its own, and every gloo
TCP device runs a thread that wakes every 10 ms (``epoll_wait`` with a
10 ms timeout) even when nothing is sent. megatron-core builds about twenty
groups per layout, so each rank runs 20-60 such threads; with four ranks of
one pool and the idle ranks of other pools on a 2-core machine that was
400+ threads, and they took over a quarter of the machine's CPU in the
downstream matrix (``perf``: 27 % of samples in ``gloo_tcp_loop`` threads).
With one device per rank the matrix took 161-186 s instead of 199-310 s
(three runs each, alternated; README, "Where a rank task's time goes").

``share_one_device()`` makes every gloo group this process creates from
then on use one device (one such thread), created like torch's own: from
``GLOO_SOCKET_IFNAME`` when set, else the host's default. Sharing a device
between contexts is how gloo is built to be used; the groups, their
collectives and their results are unchanged. The rank runners (the pool's
and torchrun's) call it before ``init_process_group``.
``LORA_HARNESS_GLOO_DEVICE=own`` in the environment keeps torch's default
(a device per group), for comparison.
"""

from __future__ import annotations

import datetime
import os
import threading
from typing import Any

__all__ = ["share_one_device", "loop_threads"]

_lock = threading.Lock()
_devices: list[Any] = []


def _shared_devices(ProcessGroupGloo: Any) -> list[Any]:
    with _lock:
        if not _devices:
            names = [n for n in os.environ.get("GLOO_SOCKET_IFNAME", "").split(",") if n]
            if names:
                _devices.extend(ProcessGroupGloo.create_device(interface=n) for n in names)
            else:
                _devices.append(ProcessGroupGloo.create_default_device())
        return list(_devices)


def share_one_device() -> bool:
    """From now on, gloo groups made by ``torch.distributed`` in this process share one device.

    Idempotent; returns False (and changes nothing) where torch has no gloo.
    """
    from torch.distributed import distributed_c10d as c10d

    if not c10d.is_gloo_available() or os.environ.get("LORA_HARNESS_GLOO_DEVICE") == "own":
        return False
    real = c10d.ProcessGroupGloo
    if getattr(real, "_harness_shared_device", False):
        return True

    class SharedDeviceGloo(real):  # type: ignore[misc, valid-type]
        """``ProcessGroupGloo`` on this process's one device (a real gloo group in every other way)."""

        _harness_shared_device = True

        def __init__(self, store: Any, rank: int, size: int,
                     timeout: datetime.timedelta = datetime.timedelta(seconds=1800)) -> None:
            options = real._Options()
            options._devices = _shared_devices(real)
            options._threads = 2 * len(options._devices)  # as torch sets it: two per device
            options._timeout = timeout
            super().__init__(store, rank, size, options)

    SharedDeviceGloo.__name__ = SharedDeviceGloo.__qualname__ = "ProcessGroupGloo"
    c10d.ProcessGroupGloo = SharedDeviceGloo
    return True


def loop_threads(pid: int | str = "self") -> int:
    """How many gloo TCP loop threads a process runs (from ``/proc``; 0 where it cannot be read)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    count = 0
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as fh:
                count += fh.read().strip() == "gloo_tcp_loop"
        except OSError:
            pass
    return count
