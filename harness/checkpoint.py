"""Where the checkpoint property loads what it saved (harness/SPEC.md, "Adapter checkpoints").

An example of ``checkpoint_roundtrip`` saves the adapters at its layout X and loads them at
``case.load_layout`` Y. Y is drawn from ``load_layouts(family, X)``: X itself, and of the family's
layouts whose world fits in X's (so a run never starts a world larger than the layouts it already runs),
the first with another TP size (``MAX_LOAD_LAYOUTS``); so from X = tp2 it reaches tp1, from tp1-ep2
(data parallelism 2) tp2. Y is part of the case's JSON, so it shrinks, is stored and replays with the rest.

``checkpoint_dir`` names the directory both sides of one example use: the save task writes it, the
load task reads it, the parent removes it after the load (``harness.runs``).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from typing import Any, Mapping, Optional

__all__ = ["load_layouts", "checkpoint_factors", "checkpoint_dir", "load_layout_strategy", "checkpoint_case",
           "require_writable_root"]


#: Load layouts per saved layout: itself and one with another TP size (a third, the same TP size with another
#: data-parallel size or sequence parallelism toggled, was cut to keep the suite within its 10 minutes).
MAX_LOAD_LAYOUTS = 2


def load_layouts(family: str, layout: Any) -> list[Any]:
    """The layouts an example saved at ``layout`` may be loaded at, ``layout`` first: of the family's layouts
    whose world fits in ``layout``'s, the first with another TP size, then the first with the same TP size,
    up to ``MAX_LOAD_LAYOUTS`` in all; in a family with experts, the first that differs from ``layout`` in
    the most of TP, EP and expert TP."""
    from harness.families import get_family

    world = layout.min_world_size
    # A layout with pipeline stages loads among the pipeline layouts too (its other-TP candidate is one
    # without: a checkpoint written by stages read by a model that has none).
    sizes = (max(layout.tp, 2), max(layout.ep, 2)) + ((layout.pp,) if layout.pp > 1 else ())
    found = [y for y in get_family(family).layouts(*sizes) if y != layout and y.min_world_size <= world]
    if any(y.etp is not None and y.etp != y.tp for y in found):
        # A family with experts: the candidate that changes most of TP, EP and ETP at once (so the layouts
        # together load across EP 2 -> 1 and 1 -> 2 and ETP 1 <-> 2 as well as TP), the first of equals.
        found.sort(key=lambda y: -((y.tp != layout.tp) + (y.ep != layout.ep) + (y.etp_size != layout.etp_size)))
        return ([layout] + found[:1])[:MAX_LOAD_LAYOUTS]
    other_tp = [y for y in found if y.tp != layout.tp]
    same_tp = [y for y in found if y.tp == layout.tp]
    return ([layout] + other_tp[:1] + same_tp[:1])[:MAX_LOAD_LAYOUTS]


def checkpoint_factors(layout: Any, family: str) -> list[Any]:
    """The designed feature of the checkpoint property: the load layout, each candidate at least once."""
    from harness.design import Factor

    names = tuple(y.describe() for y in load_layouts(family, layout))
    return [Factor("load_layout", names, "the layout the saved adapters are loaded at")]


def holds(case: Any, layout: Any) -> bool:
    """Whether the case's model and LoRA can be laid out at ``layout`` too: its shape and sequence length,
    and the rank, which a column-parallel base splits over TP (harness/SPEC.md: a ``ValueError`` otherwise;
    the strategies draw ranks the example's own TP divides)."""
    from harness.errors import CaseError

    dim = (case.lora or {}).get("dim")
    if isinstance(dim, int) and layout.tp > 1 and dim % layout.tp:
        return False
    try:
        case.with_(layout=layout, load_layout=None, loop=None).validate()
    except CaseError:
        return False
    return True


def load_layout_strategy(family: str, layout: Any, case: Any, row: Optional[Mapping[str, Any]] = None) -> Any:
    """A hypothesis strategy of the layouts ``case`` (drawn at ``layout``) may be loaded at: the candidates of
    ``load_layouts`` whose shape rules it meets (a designed ``row`` fixes the choice; a row naming one the
    case cannot meet rejects the draw, and the designed search draws another case)."""
    from hypothesis import strategies as st

    from harness.layouts import ParallelLayout

    fitting = [y.describe() for y in load_layouts(family, layout) if holds(case, y)]
    wanted = None if row is None else row.get("load_layout")
    if wanted is None:
        return st.sampled_from(fitting).map(ParallelLayout.parse)
    if wanted not in fitting:
        return st.nothing()
    return st.just(ParallelLayout.parse(wanted))


def checkpoint_case(case: Any) -> Any:
    """The case as the checkpoint tasks run it: float64 (logits compared across layouts), no dropout (the
    held-out logits must not depend on masks), training mode, one micro-batch, no training loop."""
    import torch

    return case.with_(model_dtype=torch.float64, lora_dtype=None, lora={**case.lora, "dropout": 0.0}, training=True,
                      micro_batches=1, value_grid=None, loop=None)


def require_writable_root() -> None:
    """``OSError`` naming the folder and the way out when checkpoints cannot be written where the ranks write
    them (``tempfile.gettempdir()``, i.e. ``TMPDIR``): a run checks it before any rank starts, so a failed save
    is never charged to the implementation for want of a writable folder."""
    root = tempfile.gettempdir()
    try:
        with tempfile.NamedTemporaryFile(prefix="lora-harness-checkpoints-probe-", dir=root):
            pass
    except OSError as exc:
        raise OSError(f"checkpoint_roundtrip writes its checkpoints under {root} (tempfile.gettempdir()), which "
                      f"cannot be written ({type(exc).__name__}: {exc}); set TMPDIR to a writable folder, or leave "
                      "the property out") from None


def checkpoint_dir(owner_pid: int, case: Any) -> str:
    """The directory of one example's checkpoint: under the pool owner's own folder, named by the saved
    case, so concurrent runs on one machine never share one."""
    digest = hashlib.sha256(repr(case).encode()).hexdigest()[:20]
    return os.path.join(tempfile.gettempdir(), f"lora-harness-checkpoints-{owner_pid}", digest)
