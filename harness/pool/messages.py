"""What travels between the owner and its ranks: typed messages, task names, result pickling.

This module's one job is the vocabulary of the wire, shared by the local
pool (``harness.pool.pool`` and ``harness.pool.rank``, over pipes) and the
torchrun executor (``harness.launch``, over the store and gloo collectives):

* to the ranks: :class:`RunTask` (a pickled ``(fn, args, kwargs)``, local
  pool), :class:`RunNamedTask` (a task by name with its case, torchrun),
  :class:`Stop`;
* from the ranks, exactly one reply per task: :class:`TaskDone` (the
  pickled result) or :class:`TaskRaised` (a :class:`RemoteError`: what the
  task raised, as text); ``output`` carries what the rank printed where the
  transport has no output files (torchrun);
* task names: :func:`task_name` (``"module:qualname"``) and :func:`resolve`
  (back to the object);
* :func:`dumps`: results pickled with CPU tensors as raw bytes.

Nothing here is sliced by position: every message is a dataclass, and
``RemoteError`` is a named tuple (still unpacks as ``(type, message,
traceback)``, as ``RankTaskError.errors`` always did).
"""

from __future__ import annotations

import dataclasses
import importlib
import io
import pickle
import sys
import traceback
from typing import Any, Callable, ClassVar, NamedTuple, Union

__all__ = [
    "RemoteError",
    "RunTask",
    "RunNamedTask",
    "Stop",
    "TaskDone",
    "TaskRaised",
    "Reply",
    "task_name",
    "resolve",
    "dumps",
]


class _RemoteErrorFields(NamedTuple):
    exc_type: str
    message: str
    traceback: str


class RemoteError(_RemoteErrorFields):
    """What a task raised on a rank: ``type(exc).__name__``, ``str(exc)``, the formatted traceback
    (a named tuple of those three, so it unpacks as before); ``contract``: whether it was a
    ``harness.errors.SpecViolation``, decided on the rank by the exception's type."""

    def __new__(cls, exc_type: str, message: str, traceback: str, contract: bool = False) -> "RemoteError":
        self = super().__new__(cls, exc_type, message, traceback)
        self.__dict__["contract"] = bool(contract)
        return self

    def __getnewargs__(self) -> tuple:
        return (*self, self.contract)

    @classmethod
    def from_exception(cls, exc: BaseException) -> "RemoteError":
        """``exc`` as text; call it in the ``except`` block (the traceback is the one being handled)."""
        try:
            text = str(exc)
        except Exception:  # a broken __str__ must not cost us the report
            text = f"<str() of {type(exc).__name__} failed>"
        from harness.errors import SpecViolation

        return cls(type(exc).__name__, text, traceback.format_exc(), isinstance(exc, SpecViolation))


# ------------------------------------------------------------ to the ranks ---


@dataclasses.dataclass(frozen=True)
class RunTask:
    """Local pool: run ``pickle.loads(payload)``, a ``(fn, args, kwargs)``, as task ``task_id``."""

    task_id: int
    payload: bytes


@dataclasses.dataclass(frozen=True)
class RunNamedTask:
    """Torchrun world: run the task :func:`resolve` finds under ``name`` on ``case``.

    ``reset``: a fault came before, so megatron's groups are rebuilt first.
    """

    name: str
    case: Any
    reset: bool


@dataclasses.dataclass(frozen=True)
class Stop:
    """Leave the task loop."""


# ---------------------------------------------------------- from the ranks ---


@dataclasses.dataclass(frozen=True)
class TaskDone:
    """The task returned: ``value`` is its pickled result (``task_id`` 0: the pool start)."""

    ok: ClassVar[bool] = True
    value: bytes
    task_id: int = 0
    output: str = ""


@dataclasses.dataclass(frozen=True)
class TaskRaised:
    """The task (or the rank's start) raised ``error``."""

    ok: ClassVar[bool] = False
    error: RemoteError
    output: str = ""


Reply = Union[TaskDone, TaskRaised]


# ------------------------------------------------------------- task names ---


def task_name(fn: Callable) -> str:
    """``"module:qualname"`` of ``fn``, as reports name a task and :func:`resolve` reads it back."""
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"


def resolve(spec: str, what: str = "initializer") -> Callable:
    """The object named ``"package.module:function"`` (dotted attributes allowed after the colon).

    ``what`` names the thing in the ``ValueError`` for a malformed ``spec``.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{what} {spec!r} must look like 'package.module:function'")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


# ---------------------------------------------------------- result pickling ---


def _rebuild_tensor(data: bytes, dtype: Any, shape: tuple, requires_grad: bool, parameter: bool) -> Any:
    import torch

    flat = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    t = flat.view(dtype).reshape(shape)
    if parameter:
        return torch.nn.Parameter(t, requires_grad=requires_grad)
    return t.requires_grad_(True) if requires_grad else t


class _TensorPickler(pickle.Pickler):
    """Pickles CPU tensors as their raw bytes: torch's own reduction saves each
    storage with ``torch.save`` (a zip archive per tensor), about 0.1 ms a
    tensor each way, which for a rank task's records (hundreds of small
    tensors) was a tenth of a second per example. Anything unusual
    (sparse, quantized, other devices, subclasses) goes torch's way."""

    def reducer_override(self, obj: Any) -> Any:
        torch = sys.modules.get("torch")
        if torch is None or type(obj) not in (torch.Tensor, torch.nn.Parameter):
            return NotImplemented
        if obj.device.type != "cpu" or obj.layout is not torch.strided or obj.is_quantized:
            return NotImplemented
        t = obj.detach().resolve_conj().resolve_neg().contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        return _rebuild_tensor, (data, t.dtype, tuple(t.shape), obj.requires_grad, type(obj) is torch.nn.Parameter)


def dumps(value: Any) -> bytes:
    """``pickle.dumps`` with CPU tensors as raw bytes (``_TensorPickler``); ``pickle.loads`` reads it."""
    buffer = io.BytesIO()
    _TensorPickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(value)
    return buffer.getvalue()
