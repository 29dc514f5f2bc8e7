"""Compatibility name for the rank pool: everything public is in :mod:`harness.pool`.

``harness.runner`` used to hold the whole rank pool; it is now the package
``harness/pool/`` with one job per module (see its docstring). Downstream
code that imports ``harness.runner`` keeps working: this module re-exports
the package's public names. The harness itself imports ``harness.pool``.
"""

from harness.pool import (
    ADAPTIVE_FACTOR,
    ADAPTIVE_FLOOR_S,
    DEFAULT_TIMEOUT_S,
    ERROR_GRACE_S,
    MAIN_GUARD_MESSAGE,
    OUTPUT_KEEP_BYTES,
    OUTPUT_TAIL_LINES,
    SHUTDOWN_JOIN_S,
    STACK_DUMP_WAIT_S,
    RankContext,
    RankCrash,
    RankHang,
    RankPool,
    RankPoolFault,
    RankTaskError,
    RemoteError,
    default_timeout,
    dumps,
    get_pool,
    process_memory,
    shutdown_all,
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
