"""The checkpoint task on one rank (harness/SPEC.md, "Adapter checkpoints"): save at one layout, load at another.

``save_side`` trains the adapted model one plain SGD step (the same batch on
every rank, so data-parallel replicas stay equal), records the held-out
logits and this rank's adapter tensors, then saves what the LoRA object
marks for saving the way Megatron-Bridge's PEFT checkpointing does:
``set_params_to_save(model)``, the model's ``sharded_state_dict()``
filtered by ``adapter_key_filter``, megatron-core's
``dist_checkpointing.save``. Rank 0 reads back the checkpoint's metadata
(every key and its global shape). It also checks the plain path at the same
layout: a fresh model (other adapter values) given ``load_state_dict`` of
the trained model's ``state_dict()``, and its held-out logits.

``load_side`` builds a fresh model at the load layout with other adapter
values, applies the same LoRA, loads the checkpoint
(``dist_checkpointing.load`` of the filtered ``sharded_state_dict()``,
then ``load_state_dict(..., strict=False)``) and records the held-out
logits and its adapter tensors, and the adapters no loaded entry reached.

What the implementation raises is recorded with the step it happened in;
a method the LoRA object or the model lacks is recorded as missing.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Callable, Optional

import torch

from harness.evidence import CheckpointExtras
from harness.tasks.common import cpu64

__all__ = ["save_side", "load_side", "LR", "checkpoint_metadata", "dp_metadata"]

#: The plain SGD step taken before saving (so what is saved is what training made, not the start).
LR = 0.1

_METHODS = ("set_params_to_save", "adapter_key_filter")


def dp_metadata() -> dict[str, Any]:
    """The ``metadata`` megatron-core's ``sharded_state_dict`` methods need (the data-parallel group
    replicas are marked over)."""
    from megatron.core import parallel_state

    return {"dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}


def _chunks(model: Any) -> list[Any]:
    """The modules of ``model``: itself, or the chunks of a virtual-pipeline list."""
    return list(model) if isinstance(model, (list, tuple)) else [model]


def _missing(peft: Any, model: Any) -> tuple[str, ...]:
    gone = [f"LoRA.{m}" for m in _METHODS if not callable(getattr(peft, m, None))]
    for chunk in _chunks(model):
        if not callable(getattr(chunk, "sharded_state_dict", None)):
            gone.append(f"{type(chunk).__name__}.sharded_state_dict")
            break
    return tuple(gone)


def _filtered(peft: Any, model: Any) -> dict[str, Any]:
    """What an adapter checkpoint holds: each chunk's ``sharded_state_dict`` filtered by the LoRA object,
    nested per chunk (``chunk<i>``) for a list of chunks, as megatron's training nests them (the entries'
    own keys are global: a checkpoint saved with chunks loads into a model without them)."""
    peft.set_params_to_save(model)
    chunks = _chunks(model)
    dicts = [{k: v for k, v in chunk.sharded_state_dict(prefix="", metadata=dp_metadata()).items()
              if peft.adapter_key_filter(k)} for chunk in chunks]
    return dicts[0] if not isinstance(model, (list, tuple)) else {f"chunk{i}": d for i, d in enumerate(dicts)}


def _per_chunk(model: Any, state: dict[str, Any]) -> list[dict[str, Any]]:
    """A state dict as ``_filtered`` nests it, one dict per chunk."""
    if not isinstance(model, (list, tuple)):
        return [state]
    return [state.get(f"chunk{i}", {}) for i in range(len(model))]


def checkpoint_metadata(path: str) -> dict[str, tuple[int, ...]]:
    """Every key of a saved checkpoint and its global shape (megatron-core's own reading of it)."""
    from megatron.core import dist_checkpointing

    meta = dist_checkpointing.load_tensors_metadata(path)
    return {k: tuple(int(n) for n in getattr(v, "global_shape", ())) for k, v in meta.items()}


def sharding_problems(sharded: dict[str, Any]) -> list[str]:
    """megatron-core's own check of a sharded state dict (every piece of each tensor saved by exactly one main
    replica, shapes agreeing across ranks), run on every rank. ``dist_checkpointing.save`` runs it on rank 0
    alone and raises there while the other ranks wait in the save's next collective: a checkpoint that breaks
    it would hang them; checked here first, every rank skips the save with the same reason."""
    from collections import defaultdict

    from megatron.core.dist_checkpointing.mapping import ShardedObject, apply_factories
    from megatron.core.dist_checkpointing.validation import (
        _validate_objects_for_key, _validate_sharding_for_key, determine_global_metadata)

    built = dict(sharded)
    apply_factories(built)  # as the save does first (a gated fc1's gate and up halves become two pieces)
    _, global_metadata = determine_global_metadata(built)
    by_key: dict[str, list] = defaultdict(list)
    for rank, shardings in enumerate(global_metadata):
        for sharding in shardings:
            by_key[sharding.key].append((rank, sharding))
    problems = []
    for key in sorted(by_key):
        shardings = by_key[key]
        try:
            if isinstance(shardings[0][1], ShardedObject):
                found = _validate_objects_for_key(shardings)
            else:
                found = _validate_sharding_for_key(shardings)
        except AssertionError as exc:  # ranks disagree on the tensor's global shape, dtype or grid
            found = [f"ranks disagree on {key}: {exc}"]
        problems += [f"{key}: {e}" for e in found]
    return problems


def _reraise_interrupts(exc: BaseException) -> None:
    """torch's distributed checkpoint raises ``CheckpointException``, a ``BaseException``: recorded like any
    other failure, while an interrupt or exit still ends the task."""
    if isinstance(exc, (KeyboardInterrupt, SystemExit, GeneratorExit)):
        raise exc


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def save_side(peft: Any, model: Any, path: str, rank: int, train_step: Callable[[], None],
              logits: Callable[[Any], torch.Tensor], adapters: Callable[[Any], dict[str, torch.Tensor]],
              fresh: Callable[[], Any]) -> CheckpointExtras:
    """Train one step, record, save (see the module's doc). ``fresh()`` builds the same model at the same
    layout with other adapter values (for the plain ``state_dict`` round trip)."""
    from megatron.core import dist_checkpointing

    from harness import cpu

    from harness.tasks.common import any_rank

    step = "train"
    failed = None
    try:
        train_step()
    except Exception as exc:  # noqa: BLE001 - the implementation's
        failed = f"{step}: {type(exc).__name__}: {exc}"
    # Every rank knows whether another failed before the next forward pass (a pipeline stage or TP rank
    # that raised must not leave the others waiting in a collective).
    if any_rank(failed is not None):
        return CheckpointExtras(error=failed or f"{step}: another rank raised (its record says what)")
    try:
        out_logits, out_adapters = cpu64(logits(model)), {n: cpu64(t) for n, t in adapters(model).items()}
    except Exception as exc:  # noqa: BLE001 - the implementation's
        return CheckpointExtras(error=f"{step}: {type(exc).__name__}: {exc}")
    missing = _missing(peft, model)
    if missing:
        return CheckpointExtras(logits=out_logits, adapters=out_adapters, missing=missing)
    cpu.prepare_checkpointing()
    error, saved, plain = None, {}, None
    try:
        step = "sharded_state_dict"
        filtered = _filtered(peft, model)
        step = "megatron-core's sharding validation"
        problems = sharding_problems(filtered)
        if problems:
            raise RuntimeError(f"{len(problems)} problem(s): " + "; ".join(p[:300] for p in problems[:3]))
        step = "dist_checkpointing.save"
        if rank == 0:
            shutil.rmtree(path, ignore_errors=True)
            os.makedirs(path)
        _barrier()
        dist_checkpointing.save(filtered, path)
        _barrier()
        if rank == 0:
            saved = checkpoint_metadata(path)
    except BaseException as exc:  # noqa: BLE001 - the implementation's (or megatron's on what it was given)
        _reraise_interrupts(exc)
        error = f"{step}: {type(exc).__name__}: {exc}"
    plain_error = None
    other = fresh()
    try:
        states = [{k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in chunk.state_dict().items()}
                  for chunk in _chunks(model)]
        for chunk, state in zip(_chunks(other), states):
            chunk.load_state_dict(state)
    except BaseException as exc:  # noqa: BLE001
        _reraise_interrupts(exc)
        plain_error = f"{type(exc).__name__}: {exc}"
    if not any_rank(plain_error is not None):
        plain = cpu64(logits(other))
    elif plain_error is None:
        plain_error = "another rank raised in load_state_dict(state_dict()) (its record says what)"
    return CheckpointExtras(logits=out_logits, adapters=out_adapters, error=error, saved=saved, plain_logits=plain,
                            plain_error=plain_error)


def load_side(peft: Any, model: Any, path: str, logits: Callable[[Any], torch.Tensor],
              adapters: Callable[[Any], dict[str, torch.Tensor]],
              names: Callable[[Any], dict[int, str]] = lambda m: {id(p): n for n, p in m.named_parameters()},
              own: Optional[Callable[[Any], set[str]]] = None) -> CheckpointExtras:
    """Load the checkpoint into a fresh model at this layout and record (see the module's doc). ``names(model)``:
    each parameter's name as ``adapters`` gives it, by ``id`` (at a pipeline layout the whole model's names);
    ``own(model)``: the names of the adapters this rank holds (default: every name ``adapters`` gives, which
    an MoE rank's whole-model record exceeds by the other EP ranks' experts)."""
    from megatron.core import dist_checkpointing

    from harness import cpu

    missing = _missing(peft, model)
    if missing:
        return CheckpointExtras(missing=missing)
    from harness.tasks.common import any_rank

    cpu.prepare_checkpointing()
    step = "sharded_state_dict"
    error = None
    try:
        filtered = _filtered(peft, model)
        step = "dist_checkpointing.load"
        loaded = dist_checkpointing.load(filtered, path)
        step = "load_state_dict"
        named = names(model)
        reached: set[str] = set()
        unexpected_keys: list[str] = []
        for chunk, state in zip(_chunks(model), _per_chunk(model, loaded)):
            result = chunk.load_state_dict(state, strict=False)
            unexpected_keys += list(getattr(result, "unexpected_keys", ()) or ())
            own_params = dict(chunk.named_parameters())
            reached |= {named[id(own_params[k])] for k in state if k in own_params and id(own_params[k]) in named}
    except BaseException as exc:  # noqa: BLE001
        _reraise_interrupts(exc)
        error = f"{step}: {type(exc).__name__}: {exc}"
    # Every rank knows whether another failed before the record's collectives (whole adapters, logits).
    if any_rank(error is not None):
        return CheckpointExtras(error=error or f"{step}: another rank raised (its record says what)")
    recorded = {n: cpu64(t) for n, t in adapters(model).items()}
    held = set(recorded) if own is None else own(model)
    return CheckpointExtras(logits=cpu64(logits(model)), adapters=recorded, not_loaded=tuple(sorted(held - reached)),
                            unexpected=tuple(sorted(unexpected_keys)))
