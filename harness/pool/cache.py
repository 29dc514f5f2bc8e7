"""get_pool: one live pool per ``(world_size, backend)`` in this process, reused or replaced.

This module's one job is to hand out the cached pool of a world size and
backend, starting (or restarting) it when it is missing, retired, dead or
configured differently. The cache itself (``lifecycle._pools``) is in
``harness.pool.lifecycle``, which shuts its pools down at exit.
"""

from __future__ import annotations

import os

from harness.pool import lifecycle
from harness.pool.pool import RankPool
from harness.pool.rank import refuse_inside_rank
from harness.pool.timeouts import ERROR_GRACE_S, QUIET_S, ceiling_of, quiet_setting, seconds

__all__ = ["get_pool"]


def get_pool(world_size: int, backend: str = "gloo", **kw) -> RankPool:
    """The live pool for ``(world_size, backend)`` in this process, started if needed.

    ``kw`` are :class:`RankPool`'s keyword arguments. A retired or dead pool
    is replaced transparently; so is one started with different
    ``initializer``/``preload``/``timeout`` (``None`` and
    ``DEFAULT_TIMEOUT_S`` are the same), since its ranks would run tasks in
    the wrong environment or with the wrong process-group timeout.
    ``error_grace`` and ``quiet`` only concern the owner, so a live pool
    just takes the values of the latest call (defaults ``ERROR_GRACE_S``,
    ``QUIET_S``).
    """
    refuse_inside_rank()
    key = (world_size, backend)
    wanted = (kw.get("initializer"), tuple(kw.get("preload", ("torch",))), ceiling_of(kw.get("timeout")))
    grace = seconds("error_grace", kw.get("error_grace", ERROR_GRACE_S), allow_zero=True)
    quiet = quiet_setting(kw.get("quiet", QUIET_S))
    with lifecycle._pools_lock:
        pools = lifecycle._pools
        pool = pools.get(key)
        if pool is not None and pool.owner_pid != os.getpid():
            pools.clear()  # inherited by fork: those ranks belong to the parent
            pool = None
        if pool is not None:
            if not pool.alive or pool._config() != wanted:
                pool.shutdown()
                pool = None
        if pool is None:
            pool = RankPool(world_size, backend, **kw)
            pools[key] = pool
        else:
            pool.error_grace = grace
            pool.quiet = quiet
        return pool
