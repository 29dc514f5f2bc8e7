"""Rank pools: run one task on every rank of a persistent multi-process world.

A pool keeps, per ``(world_size, backend)``, rank processes that already
hold an initialised ``torch.distributed`` process group, runs a picklable
task on every rank, and returns either every rank's result or one
human-readable fault report. It knows nothing about LoRA, megatron or
layouts; those arrive through ``initializer`` and the tasks.

One job per module:

* ``messages``   - typed messages between the owner and its ranks; task names; result pickling
* ``timeouts``   - the timeout policy (ceiling, adaptive timeout, error grace)
* ``faults``     - RankTaskError / RankCrash / RankHang and their report text
* ``rank``       - what a rank process runs (start, task loop, owner watchdog)
* ``output``     - the owner's reading of each rank's output and stack files
* ``pool``       - RankPool: start the ranks, run a task, collect replies, retire
* ``forkserver`` - the fork server ranks come from (preload, socket directory)
* ``cache``      - get_pool: one live pool per (world_size, backend)
* ``lifecycle``  - every pool of this process, ended at exit and on SIGTERM

The torchrun executor (``harness.launch``) reuses ``messages``,
``timeouts`` and ``faults`` over a torchrun world.
"""

from harness.pool.cache import get_pool
from harness.pool.faults import (
    MAIN_GUARD_MESSAGE,
    OUTPUT_TAIL_LINES,
    RankCrash,
    RankHang,
    RankPoolFault,
    RankTaskError,
)
from harness.pool.lifecycle import shutdown_all
from harness.pool.messages import RemoteError, dumps
from harness.pool.output import OUTPUT_KEEP_BYTES, STACK_DUMP_WAIT_S
from harness.pool.pool import SHUTDOWN_JOIN_S, RankPool, process_memory
from harness.pool.rank import RankContext
from harness.pool.timeouts import (
    ADAPTIVE_FACTOR,
    ADAPTIVE_FLOOR_S,
    DEFAULT_TIMEOUT_S,
    ERROR_GRACE_S,
    default_timeout,
    task_timeout,
)

__all__ = [
    "RankPoolFault",
    "RankTaskError",
    "RankCrash",
    "RankHang",
    "RemoteError",
    "RankContext",
    "RankPool",
    "get_pool",
    "shutdown_all",
    "default_timeout",
    "task_timeout",
    "process_memory",
    "dumps",
    "DEFAULT_TIMEOUT_S",
    "ADAPTIVE_FLOOR_S",
    "ADAPTIVE_FACTOR",
    "ERROR_GRACE_S",
    "SHUTDOWN_JOIN_S",
    "STACK_DUMP_WAIT_S",
    "OUTPUT_KEEP_BYTES",
    "OUTPUT_TAIL_LINES",
    "MAIN_GUARD_MESSAGE",
]
