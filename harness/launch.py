"""``torchrun ... -m harness.launch verify ...``: the property suite over a torchrun (or Slurm) world.

    torchrun --nnodes N --nproc-per-node P -m harness.launch verify --tp T --ep E [--impl M]
             [--report DIR] [--rank-timeout S] [any other ``lora-harness verify`` flag]

Every rank joins one world (``env://`` rendezvous: the store torchrun's
agent hosts). Backend: NCCL when every rank has a GPU of its own
(``torch.cuda.is_available()`` and ``LOCAL_RANK < torch.cuda.device_count()``
on every rank, agreed through the store), gloo otherwise. Each rank sets
``torch.set_num_threads(1)`` and runs ``harness.cpu.rank_initializer`` as a
local pool's rank does.

Rank 0 runs ``lora-harness verify`` itself (``harness.cli.verify``, the same
code path and outputs) with a :class:`TorchrunExecutor`: hypothesis draws,
shrinks and compares on rank 0; the other ranks serve tasks until rank 0
says stop. One task:

1. rank 0 sets ``task/<n>`` in the store and broadcasts a
   ``harness.pool.messages.RunNamedTask`` (task name, case, reset) over a
   gloo control group (``broadcast_object_list``);
2. every rank runs ``task(ctx, case)`` (rank 0 in a worker thread, so its
   main thread keeps the deadline), catching what it raises; it then marks
   itself done in the store;
3. rank 0 waits for every rank's mark until the task's deadline (the
   ``--rank-timeout`` ceiling, then adaptive as in the local pool); when all
   are done it sets ``gather/<n>`` and every rank sends its reply
   (``TaskDone`` or ``TaskRaised``, with what it printed) with
   ``gather_object``.

Waiting for the next task and for the gather happens on the store, never
in a collective, so a rank idle while rank 0 draws or compares never times
out; a collective starts only when every rank is known to be there, and
runs under the ``--rank-timeout`` process-group timeout.

Where cases run: a case at a layout runs on the whole world, the layout
carved out of it by megatron-core's own rank generator
(``ParallelLayout.initialize_megatron(world_size)``): data parallelism
fills the world (tp2 in a world of 4 is tp2 x dp2; each data-parallel
replica is compared). A layout whose model-parallel size does not divide
the world is skipped, with the reason printed and recorded. The
world-size-1 runs (``reference``, ``reference64``, ``impl_tp1``) run on
rank 0 in a local world-1 rank pool (``Executor.pool(1)``), independent of
the torchrun world.

Faults: a rank whose task raises reports its traceback in the gather
(verdict ``crash``, or ``contract`` for a SPEC violation, as locally). When
some ranks do not report by the deadline (a hang), or stay silent
``ERROR_GRACE_S`` after another rank raised (blocked in a collective with
it: megatron's groups time out only after 30 minutes), rank 0 asks every
silent rank for its Python stacks (through the store; a helper thread on
each rank answers), reports the fault naming the ranks (the local pool's
report, ``harness.pool.faults``), and the world is
lost: the run stops after that property, rank 0 writes the report and
exits 1, and torchrun's agent ends the remaining ranks. A rank that dies
makes torchrun's agent tear the job down (``record`` on the entry point
prints its traceback); rank 0 writes results after every property/layout
cell, so the report up to the cell before stays.
"""

from __future__ import annotations

import datetime
import faulthandler
import io
import os
import pickle
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Optional, Sequence

from torch.distributed.elastic.multiprocessing.errors import record

from harness.pool.faults import RankPoolFault, make_fault
from harness.pool.lifecycle import shutdown_all
from harness.pool.messages import RemoteError, Reply, RunNamedTask, Stop, TaskDone, TaskRaised, resolve, task_name
from harness.pool.rank import RankContext
from harness.pool.timeouts import DEFAULT_TIMEOUT_S, adaptive_timeout
from harness.runs import REFERENCE_IMPL, Executor

__all__ = ["TorchrunWorld", "TorchrunExecutor", "main", "ERROR_GRACE_S", "STACK_WAIT_S"]

#: Seconds the silent ranks get to report after another rank raised; after
#: that they are taken as blocked (in a collective with the failed rank).
ERROR_GRACE_S = 2.0
#: Seconds rank 0 waits for the stacks of silent ranks.
STACK_WAIT_S = 3.0

_POLL_S = 0.01
_IDLE_WAIT = datetime.timedelta(seconds=30)


# ------------------------------------------------------------- rank side ---


class _ThreadOutput(io.TextIOBase):
    """``sys.stdout``/``sys.stderr`` stand-in: a thread that is capturing writes to its buffer, others pass through."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.buffers: dict[int, io.StringIO] = {}

    def write(self, text: str) -> int:
        buf = self.buffers.get(threading.get_ident())
        return (buf if buf is not None else self.real).write(text)

    def flush(self) -> None:
        self.real.flush()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self.real.fileno()


def _install_capture() -> tuple[_ThreadOutput, _ThreadOutput]:
    out, err = _ThreadOutput(sys.stdout), _ThreadOutput(sys.stderr)
    sys.stdout, sys.stderr = out, err
    return out, err


def _stacks_text() -> str:
    """The Python stacks of every thread of this process, as faulthandler prints them."""
    with tempfile.TemporaryFile("w+") as fh:
        faulthandler.dump_traceback(file=fh, all_threads=True)
        fh.seek(0)
        return fh.read()


class TorchrunWorld:
    """This process's rank of the torchrun world: process group, control group, store, task loop."""

    def __init__(self, timeout: float) -> None:
        import torch
        import torch.distributed as dist

        self.timeout = float(timeout)
        td = datetime.timedelta(seconds=self.timeout)
        raw, rank, world_size = next(dist.rendezvous("env://", timeout=td))
        run = f"{os.environ.get('TORCHELASTIC_RUN_ID', 'none')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        self.prefix = f"lora-harness/{run}/"
        self.store = dist.PrefixStore(self.prefix, raw)
        self.rank, self.world_size = rank, world_size
        local = int(os.environ.get("LOCAL_RANK", "0"))
        has_gpu = torch.cuda.is_available() and local < torch.cuda.device_count()
        # Every rank must agree: NCCL only when every rank has a GPU of its own.
        self.store.add("gpu-ranks", 1 if has_gpu else 0)
        self.store.add("gpu-votes", 1)
        deadline = time.monotonic() + self.timeout
        while self.store.add("gpu-votes", 0) < world_size:
            if time.monotonic() > deadline:
                raise RuntimeError(f"rank {rank}: not every rank reported whether it has a GPU within {self.timeout:g} s")
            time.sleep(_POLL_S)
        self.backend = "nccl" if self.store.add("gpu-ranks", 0) == world_size else "gloo"
        if self.backend == "nccl":
            torch.cuda.set_device(local)
            device = torch.device("cuda", local)
        else:
            device = torch.device("cpu")
        from harness.gloo import share_one_device

        share_one_device()  # one gloo loop thread per rank, not one per group (harness.gloo)
        dist.init_process_group(self.backend, store=dist.PrefixStore("pg/", self.store), rank=rank,
                                world_size=world_size, timeout=td)
        # The control path: its own gloo group, untouched by the groups tasks build.
        self.control = dist.new_group(backend="gloo", timeout=td)
        torch.set_num_threads(1)
        self.ctx = RankContext(rank=rank, world_size=world_size, backend=self.backend, pid=os.getpid(), device=device)
        from harness.cpu import rank_initializer

        rank_initializer(self.ctx)
        self.stdout, self.stderr = _install_capture()
        self._start_stack_server()

    # -- stacks on request --------------------------------------------------

    def _start_stack_server(self) -> None:
        """A daemon thread that, once rank 0 sets ``dump``, writes this rank's stacks to ``stacks/<rank>``.

        It has its own store client: a blocking wait must not hold the one the main thread uses.
        """
        import torch.distributed as dist

        host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        if not host or not port:
            return

        def serve() -> None:
            try:
                client = dist.PrefixStore(self.prefix, dist.TCPStore(host, int(port), is_master=False,
                                                                     timeout=datetime.timedelta(seconds=60)))
                while True:
                    try:
                        client.wait(["dump"], datetime.timedelta(days=1))
                        break
                    except Exception:  # noqa: BLE001 - a timed out wait: wait again; a lost store ends the thread below
                        if not client.check(["dump"]) and not threading.main_thread().is_alive():
                            return
                        continue
                client.set(f"stacks/{self.rank}", _stacks_text())
            except Exception:  # noqa: BLE001 - the store is gone: the job is ending
                return

        threading.Thread(target=serve, name="lora-harness-stack-server", daemon=True).start()

    # -- one task -------------------------------------------------------------

    def execute(self, name: str, case: Any, reset: bool) -> Reply:
        """Run the task on this rank: ``TaskDone`` (the pickled value) or ``TaskRaised``, with what it printed."""
        buf = io.StringIO()
        me = threading.get_ident()
        self.stdout.buffers[me] = self.stderr.buffers[me] = buf
        blob, error = b"", None
        try:
            try:
                if reset:
                    # After a fault every rank builds megatron's groups afresh.
                    from harness.layouts import destroy_megatron

                    destroy_megatron()
                value = resolve(name, "task")(self.ctx, case)
                try:
                    blob = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
                except BaseException as exc:
                    raise TypeError(f"the result of the task on rank {self.rank} ({type(value).__name__}) cannot be pickled: {exc}") from exc
            except BaseException as exc:  # noqa: BLE001 - SystemExit too: a task must not end the rank silently
                error = RemoteError.from_exception(exc)
        finally:
            self.stdout.buffers.pop(me, None)
            self.stderr.buffers.pop(me, None)
            self.ctx.tasks_run += 1
        if error is not None:
            return TaskRaised(error, output=buf.getvalue())
        return TaskDone(blob, output=buf.getvalue())

    def wait_key(self, key: str) -> bytes:
        """The value of ``key`` once set; waits as long as it takes (rank 0 may be busy drawing or comparing)."""
        while True:
            try:
                self.store.wait([key], _IDLE_WAIT)
                return self.store.get(key)
            except Exception:  # noqa: BLE001 - a timed out wait (DistStoreError): wait again
                if self.store.check([key]):
                    return self.store.get(key)

    def serve(self) -> int:
        """Ranks other than 0: run what rank 0 broadcasts until it says stop; the exit status."""
        import torch.distributed as dist

        n = 0
        while True:
            n += 1
            self.wait_key(f"task/{n}")
            box: list = [None]
            dist.broadcast_object_list(box, src=0, group=self.control)
            msg = box[0]
            if isinstance(msg, Stop):
                break
            reply = self.execute(msg.name, msg.case, msg.reset)
            if not reply.ok:
                # Also through the store: rank 0 reads it there when other ranks are blocked and no gather can run.
                self.store.set(f"error/{n}/{self.rank}", pickle.dumps(reply))
                self.store.add(f"errors/{n}", 1)
            self.store.set(f"done/{n}/{self.rank}", "ok" if reply.ok else "err")
            self.store.add(f"done/{n}", 1)
            if self.wait_key(f"gather/{n}") != b"go":
                # Rank 0 lost the world and ends the job. Leave at once: an orderly
                # teardown could wait on groups whose peers are blocked.
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(0)
            dist.gather_object(reply, None, dst=0, group=self.control)
        self.close()
        return 0

    def close(self) -> None:
        import torch.distributed as dist

        try:
            from harness.layouts import destroy_megatron

            destroy_megatron()
        except Exception:  # noqa: BLE001
            pass
        if dist.is_initialized():
            dist.destroy_process_group()


# ------------------------------------------------------------- rank 0 ------


class TorchrunExecutor(Executor):
    """The ``harness.runs.Executor`` of rank 0: cases at a layout run on the torchrun world.

    ``run(case, task)`` sends the task to every rank and returns one record
    per rank, or raises ``RankTaskError``/``RankHang`` as a local pool does.
    World-size-1 runs (``run_alone``: the reference, the float64 reference,
    the implementation at TP=1) go to rank 0's local world-1 pool
    (``Executor.pool(1)``).
    """

    write_each_cell = True

    def __init__(self, world: TorchrunWorld, *, reference: str = REFERENCE_IMPL, cache_size: int = 256,
                 error_grace: float = ERROR_GRACE_S) -> None:
        super().__init__("gloo", timeout=world.timeout, reference=reference, cache_size=cache_size)
        self.world = world
        self.error_grace = error_grace
        self.stop_reason: Optional[str] = None  # set when the world is lost
        self._lost: Any = None  # (case repr, fault) of the fault that lost it
        self._n = 0
        self._reset = False
        self._slowest: Optional[float] = None

    # -- where a run goes -----------------------------------------------------

    def layout_skip_reason(self, layout: Any) -> Optional[str]:
        if layout.fits(self.world.world_size):
            return None
        return (f"its model-parallel size needs a world that is a multiple of {layout.min_world_size}; "
                f"the torchrun world has {self.world.world_size} ranks")

    def run_alone(self, case: Any) -> Any:
        """World-size-1 runs go to rank 0's local world-1 pool, apart from the torchrun world."""
        if self._lost is not None:
            self._refuse(case)
        return Executor.run(self, case)[0]

    def run(self, case: Any, task: Optional[Callable[..., Any]] = None) -> list[Any]:
        if self._lost is not None:
            self._refuse(case)
        validate = getattr(case, "validate", None)
        if validate is not None:
            validate()
        from harness.families import get_family

        task = task or get_family(case.family).task
        why = self.layout_skip_reason(case.layout)
        if why:
            from harness.layouts import LayoutError

            raise LayoutError(f"layout {case.layout}: {why}")
        return self._run_world(task, case)

    def _refuse(self, case: Any) -> None:
        """After the world is lost: inside hypothesis, new candidates are rejected (the example that
        faulted stays the minimal one); the case that faulted, and any case outside hypothesis,
        get the fault again."""
        key, fault = self._lost
        from hypothesis import currently_in_test_context, reject

        if repr(case) != key and currently_in_test_context():
            reject()
        raise fault

    def _run_world(self, task: Callable, case: Any) -> list[Any]:
        import torch.distributed as dist

        w = self.world
        self._n += 1
        n, name = self._n, task_name(task)
        label = f"task {name} on {w.world_size} torchrun ranks ({w.backend})"
        limit = adaptive_timeout(self.timeout, self._slowest)
        reset, self._reset = self._reset, False
        w.store.set(f"task/{n}", b"1")
        started = time.monotonic()
        dist.broadcast_object_list([RunNamedTask(name, case, reset)], src=0, group=w.control)
        own: dict[str, Reply] = {}
        thread = threading.Thread(target=lambda: own.update(reply=w.execute(name, case, reset)),
                                  name="lora-harness-rank0-task", daemon=True)
        thread.start()
        deadline = started + limit
        fault_at: Optional[float] = None
        while True:
            own_done = not thread.is_alive()
            if own_done and (w.world_size == 1 or w.store.add(f"done/{n}", 0) >= w.world_size - 1):
                break
            now = time.monotonic()
            if fault_at is None and ((own_done and not own["reply"].ok) or (w.world_size > 1 and w.store.add(f"errors/{n}", 0))):
                fault_at = now
            if now >= (deadline if fault_at is None else min(deadline, fault_at + self.error_grace)):
                break
            time.sleep(_POLL_S)
        waited = time.monotonic() - started
        done = {0} if not thread.is_alive() else set()
        done |= {r for r in range(1, w.world_size) if w.store.check([f"done/{n}/{r}"])}
        pending = [r for r in range(w.world_size) if r not in done]
        if not pending:
            w.store.set(f"gather/{n}", b"go")
            gathered: list = [None] * w.world_size
            dist.gather_object(own["reply"], gathered, dst=0, group=w.control)
            self.last_output = {r: reply.output for r, reply in enumerate(gathered) if reply.output}
            errors = {r: reply.error for r, reply in enumerate(gathered) if not reply.ok}
            if not errors:
                self._slowest = max(waited, self._slowest or 0.0)
                return [pickle.loads(reply.value) for reply in gathered]
            self._reset = True
            raise self._fault(label, limit, errors, {}, [], dict(self.last_output))
        # Some ranks are silent: the world cannot run another task.
        replies: dict[int, Reply] = {}
        if 0 in done:
            replies[0] = own["reply"]
        for r in sorted(done - {0}):
            if w.store.get(f"done/{n}/{r}") != b"ok":
                replies[r] = pickle.loads(w.store.get(f"error/{n}/{r}"))
        errors = {r: reply.error for r, reply in replies.items() if not reply.ok}
        stacks = self._stacks(pending)
        w.store.set(f"gather/{n}", b"abort")  # the ranks that reported stop waiting and leave
        fault = self._fault(label, limit, errors, stacks, pending,
                            {r: reply.output for r, reply in replies.items() if reply.output})
        self.last_output = dict(fault.output)
        self._lost = (repr(case), fault)
        silent = ", ".join(map(str, pending))
        what = (f"rank(s) {', '.join(map(str, sorted(errors)))} raised and rank(s) {silent} stayed blocked" if errors
                else f"rank(s) {silent} did not report within {limit:.3g} s")
        self.stop_reason = f"{what} ({type(fault).__name__} in {label}); the torchrun world cannot run further tasks"
        raise fault

    def _fault(self, label: str, limit: float, errors: dict, stacks: dict, pending: list,
               output: dict) -> RankPoolFault:
        """The local pool's fault and report (``harness.pool.faults``), for this world."""
        trailer = None
        if pending:
            trailer = (f"The torchrun world is lost (rank(s) {pending} cannot take another task): the run stops, "
                       "rank 0 writes the report and exits 1, and torchrun ends the other ranks.")
        return make_fault(label, world_size=self.world.world_size, limit=limit, grace=self.error_grace,
                          errors=errors, stacks=stacks, pending=pending, output=output,
                          hang_note=(f"Timeout: --rank-timeout {self.timeout:g} s, "
                                     "adaptive after the first task as in the local pool."),
                          trailer=trailer)

    def _stacks(self, ranks: list[int]) -> dict[int, str]:
        w = self.world
        stacks: dict[int, str] = {}
        if 0 in ranks:
            stacks[0] = _stacks_text()
        others = [r for r in ranks if r != 0]
        if not others:
            return stacks
        w.store.set("dump", b"1")
        end = time.monotonic() + STACK_WAIT_S
        while time.monotonic() < end and not all(w.store.check([f"stacks/{r}"]) for r in others):
            time.sleep(0.05)
        for r in others:
            if w.store.check([f"stacks/{r}"]):
                stacks[r] = w.store.get(f"stacks/{r}").decode(errors="replace")
            else:
                stacks[r] = f"<no answer within {STACK_WAIT_S:g} s: the rank holds the GIL, or is gone>"
        return stacks

    def close(self) -> None:
        """Tell the other ranks to stop (unless the world is lost: they cannot listen)."""
        import torch.distributed as dist

        if self._lost is not None or self.world.world_size == 1:
            return
        self._n += 1
        self.world.store.set(f"task/{self._n}", b"1")
        dist.broadcast_object_list([Stop()], src=0, group=self.world.control)


# ------------------------------------------------------------- entry -------


@record
def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m harness.launch`` under torchrun; the process's exit status."""
    from harness import _quiet, cli

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] != ["verify"]:
        print("usage: torchrun ... -m harness.launch verify [lora-harness verify options]", file=sys.stderr)
        return 2
    try:
        args = cli.parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    world = TorchrunWorld(args.rank_timeout or DEFAULT_TIMEOUT_S)
    if world.rank != 0:
        return world.serve()
    _quiet.quiet_parent()
    executor = TorchrunExecutor(world)
    print(f"lora-harness torchrun: {world.world_size} ranks, backend {world.backend}, rank timeout {world.timeout:g} s", flush=True)
    command = "torchrun ... -m harness.launch " + " ".join(argv)
    code = 1
    try:
        try:
            code = cli.verify(args, executor=executor, command=command)
        except cli.UsageError as exc:
            print(f"lora-harness: {exc}", file=sys.stderr)
            code = 2
    finally:
        lost = executor.stop_reason is not None
        if not lost:
            executor.close()
    if lost:
        # Rank 0's task thread may be blocked in a collective for good: leave
        # without the interpreter's teardown (which could wait on it).
        shutdown_all()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code or 1)
    world.close()
    return code


if __name__ == "__main__":
    sys.exit(main())
