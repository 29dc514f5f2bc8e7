"""Run megatron-core on CPU with gloo: the few CUDA-only calls it makes, redirected.

megatron-core assumes a GPU in a handful of places: it allocates collective
outputs on ``torch.cuda.current_device()``, keeps its RNG tracker in CUDA
generator state, and creates CUDA streams and events in the MoE token
dispatchers. This module answers those calls on CPU, and nothing else.

Two MoE paths also assume NCCL-on-GPU behaviour (``MOE_OVERRIDES``): the
alltoall dispatcher's split sizes only become host lists when they were CUDA
tensors (``maybe_move_tensor_to_cpu``), and its gather / reduce-scatter over
the expert-TP group use the list forms of ``all_gather`` / ``reduce_scatter``
with uneven sizes, which gloo refuses. Both are replaced in the module that
calls them, by functions that compute the same tensors on gloo.

Scope is the point. ``activate()`` does not touch the global ``torch.cuda``:
it rebinds the name ``torch`` inside megatron-core's own modules to a proxy
whose ``cuda`` attribute is a CPU stand-in and which forwards everything else
to the real torch. Code outside megatron-core (the harness, the user's tests,
torch itself) still sees the real ``torch.cuda``. ``deactivate()`` restores
every binding it changed.

RNG semantics: on CPU every random op draws from the CPU default generator,
so the "CUDA default generator" of megatron's tracker *is* the CPU default
generator here. ``CudaRNGStatesTracker.add(name, seed)`` stores a seeded CPU
generator state per name and ``fork(name)`` swaps it into the CPU default
generator for the region and saves the advanced state back, exactly as the
tracker does with CUDA state. A forked region therefore draws from its own
seeded per-name stream, which is what makes dropout comparable across
layouts.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import threading
import types
from typing import Any, Iterator, Optional

import torch

__all__ = [
    "activate",
    "deactivate",
    "is_active",
    "cpu_mode",
    "patch_loaded_modules",
    "seed_model_parallel",
    "manual_seed",
    "rank_initializer",
    "CUDA_SHIM",
    "suspend_override",
    "MOE_OVERRIDES",
    "cuda_tensor_types",
    "prepare_checkpointing",
    "CHECKPOINT_MODULES",
]

# Megatron modules that use CUDA-only calls on paths the harness exercises.
# They are imported on activation so that their ``torch`` binding is patched
# before any layer is built; others are patched when ``patch_loaded_modules``
# next runs (it is cheap and idempotent).
_KNOWN_MODULES = (
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.random",
    "megatron.core.tensor_parallel.utils",
    "megatron.core.tensor_parallel.cross_entropy",
    "megatron.core.parallel_state",
    "megatron.core.utils",
    "megatron.core.transformer.module",
    "megatron.core.transformer.transformer_layer",
    "megatron.core.transformer.transformer_block",
    "megatron.core.transformer.attention",
    "megatron.core.transformer.dot_product_attention",
    "megatron.core.transformer.mlp",
    "megatron.core.transformer.moe.moe_layer",
    "megatron.core.transformer.moe.experts",
    "megatron.core.transformer.moe.router",
    "megatron.core.transformer.moe.moe_utils",
    "megatron.core.transformer.moe.token_dispatcher",
    "megatron.core.transformer.moe.shared_experts",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.models.common.embeddings.language_model_embedding",
    "megatron.core.models.gpt.gpt_model",
)

_CPU = torch.device("cpu")


class _Stream:
    """A CPU stand-in for ``torch.cuda.Stream``: CPU work is already ordered."""

    def __init__(self, device: Any = None, priority: int = 0, **_: Any) -> None:
        self.device = _CPU
        self.priority = priority

    def wait_stream(self, stream: Any) -> None:
        return None

    def wait_event(self, event: Any) -> None:
        return None

    def record_event(self, event: Any = None) -> "_Event":
        event = event if event is not None else _Event()
        event.record(self)
        return event

    def synchronize(self) -> None:
        return None

    def query(self) -> bool:
        return True

    def __enter__(self) -> "_Stream":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


class _Event:
    """A CPU stand-in for ``torch.cuda.Event``: recorded work is complete."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False) -> None:
        self.enable_timing = enable_timing

    def record(self, stream: Any = None) -> None:
        return None

    def wait(self, stream: Any = None) -> None:
        return None

    def synchronize(self) -> None:
        return None

    def query(self) -> bool:
        return True

    def elapsed_time(self, other: "_Event") -> float:
        return 0.0


_DEFAULT_STREAM = _Stream()


class _Nvtx:
    """No-op NVTX ranges (profiling markers only)."""

    @staticmethod
    def range_push(msg: str) -> int:
        return 0

    @staticmethod
    def range_pop() -> int:
        return 0

    @staticmethod
    @contextlib.contextmanager
    def range(msg: str, *args: Any, **kwargs: Any) -> Iterator[None]:
        yield

    @staticmethod
    def mark(msg: str) -> None:
        return None


def _get_rng_state(device: Any = "cuda") -> torch.Tensor:
    return torch.get_rng_state()


def _set_rng_state(new_state: torch.Tensor, device: Any = "cuda") -> None:
    torch.set_rng_state(new_state)


def _manual_seed(seed: int) -> None:
    torch.default_generator.manual_seed(int(seed))


class _CudaRandomShim(types.SimpleNamespace):
    pass


class _CudaShim:
    """What megatron-core sees as ``torch.cuda`` while CPU mode is active.

    Only the calls megatron makes on CPU-reachable paths are answered here;
    every other attribute falls through to the real ``torch.cuda`` so that an
    unexpected CUDA-only call still fails loudly instead of silently lying.
    """

    Stream = _Stream
    Event = _Event
    nvtx = _Nvtx()
    random = _CudaRandomShim(get_rng_state=_get_rng_state, set_rng_state=_set_rng_state, manual_seed=_manual_seed)

    @staticmethod
    def current_device() -> torch.device:
        return _CPU

    @staticmethod
    def current_stream(device: Any = None) -> _Stream:
        return _DEFAULT_STREAM

    @staticmethod
    def default_stream(device: Any = None) -> _Stream:
        return _DEFAULT_STREAM

    @staticmethod
    @contextlib.contextmanager
    def stream(stream: Any = None) -> Iterator[Any]:
        yield stream

    @staticmethod
    def set_stream(stream: Any) -> None:
        return None

    @staticmethod
    def synchronize(device: Any = None) -> None:
        return None

    @staticmethod
    def empty_cache() -> None:
        return None

    @staticmethod
    def is_current_stream_capturing() -> bool:
        return False

    manual_seed = staticmethod(_manual_seed)
    manual_seed_all = staticmethod(_manual_seed)
    get_rng_state = staticmethod(_get_rng_state)
    set_rng_state = staticmethod(_set_rng_state)

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)


CUDA_SHIM = _CudaShim()


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, str) and (device == "cuda" or device.startswith("cuda:"))


#: Tensor factories megatron-core calls with ``device='cuda'`` (the optimizer's found-inf flag and
#: loss scale, the grad buffers' warm-up tensor, the grad-norm scratch): on the proxy they put the
#: tensor on the CPU instead. Only calls that name a CUDA device change; they would fail on CPU.
_FACTORIES = frozenset(("tensor", "zeros", "ones", "empty", "full", "arange", "zeros_like", "ones_like",
                        "empty_like", "full_like"))


def _factory_on_cpu(fn: Any) -> Any:
    def factory(*args: Any, **kwargs: Any) -> Any:
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = _CPU
        return fn(*args, **kwargs)

    factory.__name__ = getattr(fn, "__name__", "factory")
    factory.__wrapped__ = fn
    return factory


_CPU_FACTORIES = {name: _factory_on_cpu(getattr(torch, name)) for name in _FACTORIES}


class _TorchProxy(types.ModuleType):
    """The real ``torch`` module, except that ``.cuda`` is the CPU shim and the tensor
    factories put what megatron asks on ``'cuda'`` on the CPU."""

    def __init__(self) -> None:
        super().__init__("torch")
        self.__dict__["cuda"] = CUDA_SHIM
        self.__dict__.update(_CPU_FACTORIES)

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


_TORCH_PROXY = _TorchProxy()

# module name -> {global name: original object}; what deactivate() restores.
_patched: dict[str, dict[str, Any]] = {}
# Modules ``patch_loaded_modules`` has visited while active (name -> id of the
# module object): a second call looks only at modules loaded since. A model
# builder calls it once per model, and sys.modules holds thousands.
_visited: dict[str, int] = {}
#: ``sys.modules`` as last scanned (size, newest name, its id): unchanged, nothing
#: new to patch (a full scan of ~3,600 modules cost 4-8 ms of every model build).
_scanned: Optional[tuple[int, str, int]] = None
_lock = threading.RLock()
_active = False


def _cpu_get_cuda_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    # torch.get_rng_state() already returns a fresh copy.
    return torch.get_rng_state()


def _cpu_set_cuda_rng_state(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False) -> None:
    # The CUDA build's version queues the update with _lazy_call, which never
    # runs without a GPU: the tracker would silently never switch streams.
    torch.set_rng_state(new_state)


def _cpu_maybe_move_tensor_to_cpu(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
    """``moe_utils.maybe_move_tensor_to_cpu`` as it behaves for a CUDA tensor, for a CPU one.

    The alltoall token dispatcher moves its split sizes to the host with this
    at its "DtoH point" and passes them to ``all_to_all_single``. megatron's
    version converts only CUDA tensors (``tensor.is_cuda``), so on CPU the
    splits stay tensors and ``all_to_all_single`` rejects them ("incompatible
    function arguments"). Here a CPU tensor gets what a CUDA one would: a
    host copy, as a numpy array when ``as_numpy`` (``record_stream`` is a
    CUDA-allocator matter with nothing to do on CPU).
    """
    if torch.is_tensor(tensor):
        tensor = tensor.detach().to("cpu")
        if as_numpy:
            return tensor.numpy().copy()
    return tensor


def _mappings_original(name: str) -> Any:
    return _patched["megatron.core.tensor_parallel.mappings"][name]


def _cpu_gather_along_first_dim(input_: torch.Tensor, group: Any, output_split_sizes: Any = None, use_global_buffer: bool = False) -> torch.Tensor:
    """``mappings._gather_along_first_dim``, with uneven splits that gloo can do.

    With ``output_split_sizes`` (the alltoall dispatcher's gather over the
    expert-TP group) megatron calls the list form of ``all_gather``, which
    gloo refuses for tensors of different sizes ("invalid tensor size").
    Here every rank pads its rows to the largest split, the padded blocks
    are gathered (equal sizes), and the padding is dropped: the same tensor
    megatron's call returns. Equal splits go to megatron's own function.
    """
    original = _mappings_original("_gather_along_first_dim")
    if output_split_sizes is None or group.size() == 1:
        return original(input_, group, output_split_sizes, use_global_buffer)
    import torch.distributed as dist

    sizes = [int(n) for n in output_split_sizes]
    width = max(sizes)
    x = input_.contiguous()
    if x.shape[0] < width:
        x = torch.cat([x, x.new_zeros((width - x.shape[0], *x.shape[1:]))], dim=0)
    gathered = x.new_empty((width * len(sizes), *x.shape[1:]))
    dist.all_gather_into_tensor(gathered, x, group=group)
    return torch.cat([gathered[r * width : r * width + n] for r, n in enumerate(sizes)], dim=0)


def _cpu_reduce_scatter_along_first_dim(input_: torch.Tensor, group: Any, input_split_sizes: Any = None, use_global_buffer: bool = False) -> torch.Tensor:
    """``mappings._reduce_scatter_along_first_dim``, with uneven splits that gloo can do.

    The list form of ``reduce_scatter`` megatron uses for uneven
    ``input_split_sizes`` is not available on gloo; an all-reduce of the
    whole input followed by this rank's slice computes the same sums.
    """
    original = _mappings_original("_reduce_scatter_along_first_dim")
    if input_split_sizes is None or group.size() == 1:
        return original(input_, group, input_split_sizes, use_global_buffer)
    import torch.distributed as dist

    sizes = [int(n) for n in input_split_sizes]
    summed = input_.contiguous().clone()
    dist.all_reduce(summed, group=group)
    rank = dist.get_rank(group)
    start = sum(sizes[:rank])
    return summed[start : start + sizes[rank]].contiguous()


# Replacements for module-level functions, beyond the ``torch`` rebinding.
_FUNCTION_OVERRIDES: dict[str, dict[str, Any]] = {
    "megatron.core.tensor_parallel.random": {
        "_get_cuda_rng_state": _cpu_get_cuda_rng_state,
        "_set_cuda_rng_state": _cpu_set_cuda_rng_state,
    },
    # Uneven gathers / reduce-scatters over the expert-TP group (alltoall
    # dispatcher with ETP > 1); equal splits still take megatron's path.
    "megatron.core.tensor_parallel.mappings": {
        "_gather_along_first_dim": _cpu_gather_along_first_dim,
        "_reduce_scatter_along_first_dim": _cpu_reduce_scatter_along_first_dim,
    },
    # Only the dispatcher's binding: moe_utils' own function is left as it is.
    "megatron.core.transformer.moe.token_dispatcher": {
        "maybe_move_tensor_to_cpu": _cpu_maybe_move_tensor_to_cpu,
    },
}


#: The overrides the MoE token dispatchers need on CPU / gloo, as (module, function).
MOE_OVERRIDES = (
    ("megatron.core.transformer.moe.token_dispatcher", "maybe_move_tensor_to_cpu"),
    ("megatron.core.tensor_parallel.mappings", "_gather_along_first_dim"),
    ("megatron.core.tensor_parallel.mappings", "_reduce_scatter_along_first_dim"),
)


def _patch_module(mod_name: str, module: types.ModuleType) -> None:
    saved = _patched.setdefault(mod_name, {})
    glb = module.__dict__
    if glb.get("torch") is torch and "torch" not in saved:
        saved["torch"] = torch
        glb["torch"] = _TORCH_PROXY
    for fn_name, replacement in _FUNCTION_OVERRIDES.get(mod_name, {}).items():
        if fn_name in glb and fn_name not in saved and glb[fn_name] is not replacement:
            saved[fn_name] = glb[fn_name]
            glb[fn_name] = replacement
    if not saved:
        del _patched[mod_name]


def patch_loaded_modules() -> int:
    """Patch every loaded megatron-core module not yet patched; returns how many are patched.

    Call again after importing megatron modules that were not loaded at
    activation (for example a model family the harness did not preload).
    """
    global _scanned
    with _lock:
        if not _active:
            raise RuntimeError("harness.cpu: patch_loaded_modules() called while CPU mode is not active; call activate() first")
        signature = _modules_signature()
        if signature is not None and signature == _scanned:
            return len(_patched)
        for mod_name, module in list(sys.modules.items()):
            if _visited.get(mod_name) == id(module):
                continue
            _visited[mod_name] = id(module)
            if module is None or not (mod_name == "megatron.core" or mod_name.startswith("megatron.core.")):
                continue
            _patch_module(mod_name, module)
        _scanned = signature
        return len(_patched)


def _modules_signature() -> Optional[tuple[int, str, int]]:
    try:
        newest = next(reversed(sys.modules))
        return len(sys.modules), newest, id(sys.modules[newest])
    except (StopIteration, KeyError, RuntimeError):  # empty, or changed while read by another thread
        return None


def activate(import_known: bool = True) -> None:
    """Enter CPU mode for megatron-core in this process (idempotent)."""
    global _active
    with _lock:
        if import_known:
            for name in _KNOWN_MODULES:
                try:
                    importlib.import_module(name)
                except ImportError:
                    # A module that moved in another megatron-core version;
                    # it is patched later if it turns up under another name.
                    pass
        _active = True
        patch_loaded_modules()


def deactivate() -> None:
    """Leave CPU mode: restore every binding ``activate`` changed."""
    global _active, _scanned
    with _lock:
        for mod_name, saved in _patched.items():
            module = sys.modules.get(mod_name)
            if module is None:
                continue
            for name, original in saved.items():
                module.__dict__[name] = original
        _patched.clear()
        _visited.clear()
        _scanned = None
        _active = False


def is_active() -> bool:
    return _active


def suspend_override(mod_name: str, fn_name: str) -> Any:
    """Put megatron's own ``mod_name.fn_name`` back for a while; returns a function that restores the override.

    For tests that show what an override fixes (``MOE_OVERRIDES`` lists the
    MoE ones). The CUDA stand-ins and every other override stay.
    """
    with _lock:
        module = sys.modules.get(mod_name)
        saved = _patched.get(mod_name, {})
        if module is None or fn_name not in saved:
            raise RuntimeError(f"harness.cpu: no override of {mod_name}.{fn_name} is applied (CPU mode inactive?)")
        replacement = module.__dict__[fn_name]
        module.__dict__[fn_name] = saved[fn_name]

    def restore() -> None:
        with _lock:
            if fn_name in _patched.get(mod_name, {}):
                module.__dict__[fn_name] = replacement

    return restore


@contextlib.contextmanager
def cpu_mode() -> Iterator[None]:
    """CPU mode for the duration of a block; restores the previous state after."""
    was_active = _active
    activate()
    try:
        yield
    finally:
        if not was_active:
            deactivate()


def manual_seed(seed: int) -> None:
    """``torch.manual_seed(seed)``, minus the lazy GPU seeding it queues when no GPU exists.

    Each queued call formats a stack trace (about 1 ms, several per example) and never runs.
    """
    if torch.cuda.is_available():
        torch.manual_seed(seed)
    else:
        torch.default_generator.manual_seed(seed)


def seed_model_parallel(seed: int) -> None:
    """Seed torch and megatron's RNG tracker the way megatron training does.

    ``model_parallel_cuda_manual_seed`` registers the model-parallel,
    expert-parallel and data-parallel streams with per-rank offsets; in CPU
    mode they are CPU generator states. The CPU default generator is seeded
    with ``seed`` as well so that layouts start from the same state.
    """
    from megatron.core import tensor_parallel

    if not torch.cuda.is_available() and not _active:
        activate()
    manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)
    manual_seed(seed)


def rank_initializer(ctx: Any) -> None:
    """Rank-pool initializer: CPU mode on a gloo world, nothing on NCCL."""
    if getattr(ctx, "backend", "gloo") == "gloo":
        activate()


@contextlib.contextmanager
def cuda_tensor_types() -> Iterator[None]:
    """For a while, ``Tensor.type()`` (no arguments) names a CPU tensor as its CUDA type.

    megatron-core's optimizers sort parameters by ``param.type()`` against
    ``'torch.cuda.FloatTensor'`` / ``'torch.cuda.HalfTensor'`` /
    ``'torch.cuda.BFloat16Tensor'`` and raise ``TypeError`` for anything else,
    so on CPU the distributed optimizer refuses every parameter. Inside this
    block a CPU float32 parameter answers ``'torch.cuda.FloatTensor'``, as it
    would on a GPU. ``Tensor.type(dtype)`` (a conversion) is left alone; so is
    everything outside the block (the harness wraps only the optimizer's
    construction and steps, ``harness.tasks.training``).
    """
    original = torch.Tensor.type

    def cuda_type(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        out = original(self, *args, **kwargs)
        if not args and not kwargs and isinstance(out, str) and out.startswith("torch.") and not out.startswith("torch.cuda."):
            return "torch.cuda." + out[len("torch."):]
        return out

    with _lock:
        torch.Tensor.type = cuda_type  # type: ignore[method-assign]
        try:
            yield
        finally:
            torch.Tensor.type = original  # type: ignore[method-assign]


#: megatron-core's distributed-checkpoint modules, imported (and so patched) by ``prepare_checkpointing``.
CHECKPOINT_MODULES = (
    "megatron.core.dist_checkpointing.serialization",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.strategies.torch",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
)


def prepare_checkpointing() -> None:
    """Make megatron-core's ``dist_checkpointing.save`` / ``load`` run in a CPU rank process.

    Its modules call ``torch.cuda.synchronize`` and ``torch.cuda.current_device`` on the save path:
    imported here, they get the CPU stand-ins like every megatron module (in CPU mode). And its
    file writer asks a ``multiprocessing`` Manager for the queue its writer threads report to; a
    Manager is a child process, which a daemon (a rank of the harness's pools, so that none outlives
    its owner) may not start. A synchronous save only puts into that queue from threads of the same
    process, so inside a daemon a thread-safe ``queue.Queue`` stands in for it.
    """
    import importlib
    import multiprocessing
    import queue

    for name in CHECKPOINT_MODULES:
        importlib.import_module(name)
    if is_active():
        patch_loaded_modules()
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if multiprocessing.current_process().daemon and not getattr(filesystem_async, "_harness_queue", False):
        filesystem_async.get_write_results_queue = lambda mp_mode="spawn": queue.Queue()
        filesystem_async._harness_queue = True
