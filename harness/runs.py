"""Runs of one case: the implementation at its layout, the reference, the implementation at TP=1.

An ``Executor`` owns how cases reach rank pools (backend, rank timeout,
which module is the reference) and caches world-size-1 runs, which do not
depend on the layout. ``Evidence`` is one example's set of runs, each made
on first use and shared by every property checked on that example: a
property declares the runs it ``needs`` and reads them from here.
"""

from __future__ import annotations

import collections
import os
from typing import Any, Callable, Optional

from harness.layouts import ParallelLayout
from harness.families import get_family

__all__ = ["Executor", "Evidence", "RUN_KINDS", "REFERENCE_IMPL"]

REFERENCE_IMPL = "lora.reference"

# name -> what it is; properties list the ones they need.
RUN_KINDS = {
    "impl": "the implementation under test at the case's layout (one record per rank)",
    "reference": "the reference implementation in a world of size 1, same full weights",
    "impl_tp1": "the implementation under test itself in a world of size 1",
    "errors": "the implementation under test fed bad input at the case's layout",
    "impl_ep1": "the implementation under test at the case's layout with expert parallelism 1 (same TP, ETP, SP)",
    "reference64": "the reference in float64 on the case's exact (16-bit) weights and inputs, world size 1",
    "switch": "the implementation under test's model switched off and on at the case's layout, with the base model's "
              "logits before the LoRA (the family's switch_task; harness.tasks.switch)",
    "recompute": "the implementation under test trained one forward and backward at the case's layout without and with "
                 "each activation recompute setting (the family's recompute_task; harness.tasks.recompute)",
    "training": "the implementation under test trained for the case's loop under megatron-core's DDP and optimizer at the "
                "case's layout, each data-parallel replica on its own data (the family's training_task; harness.tasks.training)",
    "training_reference": "the reference trained for the same loop with plain torch on the whole global batch, world size 1",
    "training_exact": "for a bf16 loop: the reference's loop in float64 on the bf16 run's exact starting values, world size 1",
    "checkpoint_save": "the implementation under test trained one step at the case's layout, its adapters saved with "
                       "megatron-core's dist_checkpointing (the family's checkpoint_save_task; harness.tasks.checkpoint)",
    "checkpoint_load": "the implementation under test's fresh model at the case's load layout, the checkpoint loaded "
                       "(the family's checkpoint_load_task); made after checkpoint_save, which it reads",
    "init": "the implementation under test's initial adapters on a larger one-layer model at the case's layout (the family's init_task; harness.tasks.init)",
}

# The built-in families' rank tasks, imported once in the fork server ranks start from.
_POOL_PRELOAD = ("harness._quiet", "torch", "megatron.core", "harness.families.gpt.tasks", "harness.families.gpt.init",
                 "harness.families.moe.tasks", "harness.families.moe.init", "harness.families.vlm.tasks",
                 "harness.families.gpt.switch", "harness.families.moe.switch", "harness.families.gpt.recompute",
                 "harness.families.moe.recompute", "harness.families.gpt.training",
                 "harness.families.moe.training", "harness.families.gpt.checkpoint")


class Executor:
    """Sends cases to rank pools; keeps an LRU cache of runs, keyed by what they depend on.

    ``timeout``: ceiling in seconds for one rank task (None: the pool's
    default); ``reference``: the module used as the oracle.
    """

    def __init__(
        self,
        backend: str = "gloo",
        *,
        timeout: Optional[float] = None,
        reference: str = REFERENCE_IMPL,
        cache_size: int = 2048,
    ) -> None:
        if timeout is not None and not timeout > 0:
            raise ValueError(f"Executor timeout={timeout!r}: a rank timeout must be a positive number of seconds")
        self.backend = backend
        self.timeout = timeout
        self.reference_impl = reference
        self._cache: "collections.OrderedDict[tuple, Any]" = collections.OrderedDict()
        self._cache_size = cache_size
        self.last_output: dict[int, str] = {}

    def pool(self, world_size: int) -> Any:
        from harness.pool import get_pool

        kwargs: dict[str, Any] = dict(initializer="harness.cpu:rank_initializer", preload=_POOL_PRELOAD)
        if self.timeout is not None:
            kwargs["timeout"] = self.timeout
        return get_pool(world_size, self.backend, **kwargs)

    def run(self, case: Any, task: Optional[Callable[..., Any]] = None) -> list[Any]:
        """``task`` (default: the case family's forward/backward task) on every rank of a pool
        sized for the case's layout; one record per rank.

        The case is validated here, in the parent, so a configuration no
        layout can run is a ``CaseError`` before any rank starts work.
        """
        validate = getattr(case, "validate", None)
        if validate is not None:
            validate()
        task = task or get_family(case.family).task
        pool = self.pool(case.layout.min_world_size)
        try:
            return pool.run(task, case)
        finally:
            self.last_output = {r: t for r, t in (getattr(pool, "last_output", None) or {}).items() if t}

    def run_alone(self, case: Any) -> Any:
        """A world-size-1 run (the reference, the float64 reference, the implementation at TP=1):
        the one record. An executor over a fixed world (``harness.launch``) runs these apart from it."""
        return self.run(case)[0]

    def cached(self, key: tuple, make: Callable[[], Any]) -> tuple[Any, dict[int, str]]:
        """``make()`` once per ``key`` (LRU), with what the ranks printed while it ran.

        A run that raises is not cached: the fault is reported each time.
        """
        if key in self._cache:
            self._cache.move_to_end(key)
        else:
            self.last_output = {}
            value = make()
            self._cache[key] = (value, dict(self.last_output))
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return self._cache[key]


def _task(family: str, kind: str) -> Callable[..., Any]:
    """The family's ``error_task``, ``init_task``, ``switch_task``, ``recompute_task`` or ``training_task``;
    ``ValueError`` when it has none."""
    task = getattr(get_family(family), kind)
    if task is None:
        raise ValueError(f"family {family!r} has no {kind} (a property that needs it cannot run on this family)")
    return task


class Evidence:
    """The runs one example needs, each made on first use and shared by the properties."""

    def __init__(self, executor: Executor, case: Any) -> None:
        self.executor = executor
        self.case = case
        self.layout: ParallelLayout = case.layout
        self._runs: dict[str, Any] = {}
        self.output: dict[int, str] = {}

    def get(self, kind: str) -> Any:
        if kind not in RUN_KINDS:
            raise KeyError(f"unknown run kind {kind!r}; known: {', '.join(RUN_KINDS)}")
        if kind not in self._runs:
            value, output = getattr(self, f"_make_{kind}")()
            self._runs[kind] = value
            for rank, text in output.items():
                self.output[rank] = self.output.get(rank, "") + text
        return self._runs[kind]

    # Each run is cached in the executor under the whole case, so properties
    # checked on the same example (the driver draws the same examples for
    # every property at a layout) share it.
    def _make_impl(self) -> tuple[Any, dict[int, str]]:
        return self.executor.cached(("impl", repr(self.case)), lambda: self.executor.run(self.case))

    def _make_errors(self) -> tuple[Any, dict[int, str]]:
        # The bad-input tasks read only the implementation, contract, layout,
        # shape, base dtype and seed (never the LoRA config, mode or adapter
        # dtype): examples that agree on those share one run.
        c = self.case
        key = ("errors", c.family, c.impl, c.contract, repr(c.layout), repr(c.shape), c.model_dtype, c.seed)
        return self.executor.cached(key, lambda: self.executor.run(c, _task(c.family, "error_task")))

    def _make_reference(self) -> tuple[Any, dict[int, str]]:
        ref = self.case.with_(impl=self.executor.reference_impl, layout=ParallelLayout(), contract="strict")
        key = ("reference", self.executor.reference_impl, self.case.reference_key())
        return self.executor.cached(key, lambda: self.executor.run_alone(ref))

    def _make_reference64(self) -> tuple[Any, dict[int, str]]:
        import torch

        from harness.cases import dtype_name

        case = self.case
        grid = (dtype_name(case.model_dtype), dtype_name(case.lora_dtype or case.model_dtype))
        ref = case.with_(impl=self.executor.reference_impl, layout=ParallelLayout(), contract="strict",
                         model_dtype=torch.float64, lora_dtype=torch.float64, value_grid=grid)
        key = ("reference", self.executor.reference_impl, ref.reference_key())
        return self.executor.cached(key, lambda: self.executor.run_alone(ref))

    def _make_impl_tp1(self) -> tuple[Any, dict[int, str]]:
        base = self.case.with_(layout=ParallelLayout())
        return self.executor.cached(("impl_tp1", self.case.impl, self.case.reference_key()), lambda: self.executor.run_alone(base))

    def _make_impl_ep1(self) -> tuple[Any, dict[int, str]]:
        import dataclasses

        case = self.case.with_(layout=dataclasses.replace(self.layout, ep=1, etp=self.layout.etp_size))
        return self.executor.cached(("impl", repr(case)), lambda: self.executor.run(case))

    def _make_init(self) -> tuple[Any, dict[int, str]]:
        task = _task(self.case.family, "init_task")
        return self.executor.cached(("init", repr(self.case)), lambda: self.executor.run(self.case, task))

    def _make_switch(self) -> tuple[Any, dict[int, str]]:
        task = _task(self.case.family, "switch_task")
        return self.executor.cached(("switch", repr(self.case)), lambda: self.executor.run(self.case, task))

    def _make_recompute(self) -> tuple[Any, dict[int, str]]:
        task = _task(self.case.family, "recompute_task")
        return self.executor.cached(("recompute", repr(self.case)), lambda: self.executor.run(self.case, task))

    def _make_training(self) -> tuple[Any, dict[int, str]]:
        from harness.training import training_case

        task = _task(self.case.family, "training_task")
        case = training_case(self.case)
        return self.executor.cached(("training", repr(case)), lambda: self.executor.run(case, task))

    def _make_training_reference(self) -> tuple[Any, dict[int, str]]:
        from harness.training import reference_training_case

        task = _task(self.case.family, "training_task")
        ref = reference_training_case(self.case, self.executor.reference_impl)
        key = ("training_reference", self.executor.reference_impl, ref.reference_key(), repr(ref.loop))
        return self.executor.cached(key, lambda: self.executor.run(ref, task)[0])

    def _make_training_exact(self) -> tuple[Any, dict[int, str]]:
        from harness.training import exact_training_case

        task = _task(self.case.family, "training_task")
        ref = exact_training_case(self.case, self.executor.reference_impl)
        key = ("training_exact", self.executor.reference_impl, ref.reference_key(), repr(ref.loop))
        return self.executor.cached(key, lambda: self.executor.run(ref, task)[0])

    def _make_checkpoint_save(self) -> tuple[Any, dict[int, str]]:
        from harness.checkpoint import checkpoint_case

        task = _task(self.case.family, "checkpoint_save_task")
        case = checkpoint_case(self.case)
        return self.executor.cached(("checkpoint_save", repr(case)), lambda: self.executor.run(case, task))

    def _make_checkpoint_load(self) -> tuple[Any, dict[int, str]]:
        from harness.checkpoint import checkpoint_case

        saved = checkpoint_case(self.case)
        case = saved.with_(layout=saved.load_layout, load_layout=saved.layout)
        task = _task(self.case.family, "checkpoint_load_task")

        def load() -> Any:
            self.get("checkpoint_save")  # the save side writes what this run reads
            try:
                return self.executor.run(case, task)
            finally:
                self.discard_checkpoint()

        return self.executor.cached(("checkpoint_load", repr(case)), load)

    def discard_checkpoint(self) -> None:
        """Remove the directory this example's checkpoint ranks wrote (their pools' owner is this process:
        ``harness.checkpoint.checkpoint_dir``), and this process's folder of them once it is empty."""
        import shutil

        from harness.checkpoint import checkpoint_case, checkpoint_dir

        where = checkpoint_dir(os.getpid(), checkpoint_case(self.case))
        shutil.rmtree(where, ignore_errors=True)
        try:
            os.rmdir(os.path.dirname(where))
        except OSError:
            pass  # another example's checkpoint is still there, or none was written

    # Shorthands the property modules read.
    @property
    def impl(self) -> list[Any]:
        return self.get("impl")

    @property
    def reference(self) -> Any:
        return self.get("reference")

    @property
    def impl_tp1(self) -> Any:
        return self.get("impl_tp1")

    @property
    def errors(self) -> list[Any]:
        return self.get("errors")

    @property
    def reference64(self) -> Any:
        return self.get("reference64")

    @property
    def impl_ep1(self) -> list[Any]:
        return self.get("impl_ep1")

    @property
    def init(self) -> list[Any]:
        return self.get("init")

    @property
    def switch(self) -> list[Any]:
        return self.get("switch")

    @property
    def recompute(self) -> list[Any]:
        return self.get("recompute")

    @property
    def training(self) -> list[Any]:
        return self.get("training")

    @property
    def training_reference(self) -> Any:
        return self.get("training_reference")

    @property
    def training_exact(self) -> Any:
        return self.get("training_exact")

    @property
    def checkpoint_save(self) -> list[Any]:
        return self.get("checkpoint_save")

    @property
    def checkpoint_load(self) -> list[Any]:
        return self.get("checkpoint_load")
