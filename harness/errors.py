"""Every exception the harness raises, in one module, recognised by type.

Four kinds:

* bad usage (``UsageError``, ``PlanError``): one line, exit status 2 (a
  pytest usage error under the plugin), before any rank starts;
* bad input (a layout, a shape, a case, an implementation, a file): a
  clear error naming the value and the rule;
* what the harness charges or reports (``SpecViolation``: the adapters'
  names or shapes break harness/SPEC.md, a contract finding;
  ``PropertyFailure``; ``MergeAPIError``: LoRAMerge's API cannot do what is
  asked);
* faults of the rank pool (``RankPoolFault`` and its kinds: a rank raised,
  crashed or hung). An exception raised on a rank reaches the parent as a
  ``harness.pool.messages.RemoteError``, whose ``contract`` flag is set on
  the rank from the exception's type (a ``SpecViolation``).

The modules that raise them import them from here (and keep their names,
so ``from harness.layouts import LayoutError`` still works).
"""

from __future__ import annotations

__all__ = [
    "UsageError",
    "PlanError",
    "LayoutError",
    "ShapeError",
    "CaseError",
    "ImplLoadError",
    "BridgeImportError",
    "BaselineError",
    "ReportDirectoryError",
    "SpecViolation",
    "PropertyFailure",
    "MergeAPIError",
    "RankPoolFault",
    "RankTaskError",
    "RankCrash",
    "RankHang",
    "MainGuardError",
]


class UsageError(Exception):
    """Bad usage: printed as one line, exit status 2."""


class PlanError(ValueError):
    """A run that cannot be planned (an unknown family, property or layout; sizes out of bounds):
    the message names the flag, the value and the rule. Front ends show it as a usage error."""


class LayoutError(ValueError):
    """A parallel layout that megatron-core cannot build, or a world it does not fit."""


class ShapeError(ValueError):
    """A model shape that cannot be laid out at the requested TP size."""


class CaseError(ValueError):
    """A case no layout can run (bad shape for its layout, bad MoE settings): raised in the parent."""


class ImplLoadError(Exception):
    """The implementation named for a run cannot be used; ``str()`` says why and what to do."""


class BridgeImportError(ImportError):
    """Megatron-Bridge's peft LoRA cannot be imported here; ``str()`` says why."""


class BaselineError(ValueError):
    """A file or dict that cannot be compared: missing, not JSON, not a results.json, another schema version."""


class ReportDirectoryError(OSError):
    """The report directory cannot be created or written; the message names it."""


class SpecViolation(AssertionError):
    """The implementation under test breaks harness/SPEC.md's parameter contract."""


class PropertyFailure(AssertionError):
    """A property does not hold for an example; the message says where and by how much."""


class MergeAPIError(Exception):
    """The implementation's LoRAMerge cannot do what is asked with the API it offers (named in the message)."""


class RankPoolFault(Exception):
    """An infrastructure fault of a rank pool; ``str()`` is the full report.

    ``output``: ``{rank: text}`` the ranks printed during the failed task (or
    pool start), as ``RankPool.last_output``; empty where not applicable.
    """

    output: dict = {}


class RankTaskError(RankPoolFault):
    """One or more ranks raised.

    ``errors``: ``{rank: RemoteError(exc_type, message, traceback)}`` (a
    named tuple: unpacks as ``(exc_type_name, message, traceback_str)``);
    ``stacks``: stacks of ranks that had not reported within the grace period;
    ``pending``: those ranks.
    """

    def __init__(self, report: str, errors: dict, stacks: dict | None = None, pending: list | None = None):
        super().__init__(report)
        self.errors = errors
        self.stacks = stacks or {}
        self.pending = pending or []


class RankCrash(RankPoolFault):
    """A rank process died. ``exitcodes``: ``{rank: code}`` (negative: signal).

    ``errors`` and ``stacks`` carry what the surviving ranks reported or were
    doing, as context.
    """

    def __init__(self, report: str, exitcodes: dict, errors: dict | None = None, stacks: dict | None = None):
        super().__init__(report)
        self.exitcodes = exitcodes
        self.errors = errors or {}
        self.stacks = stacks or {}


class RankHang(RankPoolFault):
    """Ranks did not report within the timeout.

    ``pending``: ranks that did not report; ``stacks``: ``{rank: str}`` for
    every rank dumped (in a local pool: every rank, pending or not).
    """

    def __init__(self, report: str, stacks: dict, pending: list, timeout: float):
        super().__init__(report)
        self.stacks = stacks
        self.pending = pending
        self.timeout = timeout


class MainGuardError(RuntimeError):
    """A rank process re-imported a ``__main__`` that starts rank pools."""
