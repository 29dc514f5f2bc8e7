"""checkpoint_roundtrip: adapters saved at one layout load at another and compute the same model.

Two runs of the implementation (``harness.tasks.checkpoint``): at the
example's layout X, one plain SGD step, then the adapters saved the way
Megatron-Bridge's PEFT checkpointing saves them (``set_params_to_save``,
the model's ``sharded_state_dict`` filtered by ``adapter_key_filter``,
megatron-core's ``dist_checkpointing.save``); at the example's
``load_layout`` Y, a fresh model with other adapter values, the same LoRA,
``dist_checkpointing.load`` and ``load_state_dict``. No reference is needed:
the loaded adapters, put back together over Y's TP, must be bit for bit
those trained at X, put back together over X's TP, and Y's held-out logits
X's (float64; different layouts sum in other orders). The checkpoint must
hold each adapter tensor exactly once, under its parameter name, with its
full shape: a shard that never reached it or a duplicate entry is named
(megatron-core's own save refuses overlapping or missing pieces of one
tensor). The plain path at X as well: a fresh model given
``load_state_dict(model.state_dict())`` computes the same logits, bit for bit.
"""

from __future__ import annotations

import math
import re
from typing import Any

from harness.compare import FLOAT64, Tolerance, compare_tensors
from harness.properties import Property, register
from harness.properties._gather import layout_violations, no_adapter_reason, replicas
from harness.results import Check, Location
from harness.rules.adapters import is_expert_name

EXACT = Tolerance(rtol=0.0, atol=0.0)


def _shown(names: Any, limit: int = 4) -> str:
    names = list(names)
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def stacked_key(name: str) -> str:
    """The checkpoint entry a parameter is saved in: megatron-core's TransformerBlock saves its layers as
    one entry per parameter, stacked along a leading layer axis (``decoder.layers.3.x`` -> ``decoder.layers.x``)."""
    return re.sub(r"\.layers\.\d+\.", ".layers.", name, count=1)


def _full_shapes(records: list[Any]) -> dict[str, tuple[int, ...]]:
    return {p: tuple(part.full_shape) for p, part in records[0].partitions.items()}


def _expert_elements(result: Check, saved_at: Any, experts: dict[str, tuple[int, ...]],
                     entries: dict[str, tuple[int, ...]], contract: str) -> None:
    """The routed experts' adapters in the checkpoint, counted: the entries no other adapter claims must hold
    exactly as many elements as the experts' adapters have. Fewer: some expert's adapter (an EP rank's
    experts, an expert-TP shard) never reached the checkpoint. More: something is saved twice or a base
    tensor came through the filter; Megatron-Bridge stores a grouped linear's shared adapter once per
    expert, which the bridge contract allows (a larger file, nothing lost), so there it is advisory."""
    want = sum(math.prod(shape) for shape in experts.values())
    got = sum(math.prod(shape) for shape in entries.values())
    if got < want:
        result.fail(f"the checkpoint saved at {saved_at} holds {got} elements outside the other adapters' entries; "
                    f"the routed experts' {len(experts)} adapter tensor(s) ({_shown(sorted(experts))}) have {want}: "
                    f"an EP rank's experts or an expert-TP shard never reached it (entries: {_shown(sorted(entries))})",
                    kind="contract", check="checkpoint_keys")
    elif got > want:
        result.fail(f"the checkpoint saved at {saved_at} holds {got} elements outside the other adapters' entries; "
                    f"the routed experts' adapters have {want}: something is saved twice or is no adapter "
                    f"(entries: {_shown(sorted(entries))})", kind="contract", check="checkpoint_keys",
                    binding=contract != "bridge")


def check(ev: Any) -> Check:
    try:
        return _check(ev)
    finally:
        discard = getattr(ev, "discard_checkpoint", None)
        if discard is not None:
            discard()  # also when the load never ran (a failed save)


def _check(ev: Any) -> Check:
    saved_at, loaded_at = ev.case.layout, ev.case.load_layout
    save = ev.checkpoint_save
    broken = layout_violations("checkpoint_roundtrip", save)
    if broken is not None:
        return broken
    result = Check("checkpoint_roundtrip")
    head = save[0].extras
    if head.missing:
        result.fail(f"the LoRA object or the model has no {', '.join(head.missing)} (harness/SPEC.md, 'Adapter "
                    "checkpoints'; an implementation without them declares checkpoint: False)",
                    kind="contract", check="checkpoint_api")
        return result
    # The plain path at X: torch's own promise, load_state_dict(state_dict()) restores the model.
    plain = [(rec.rank, rec.extras.plain_error) for rec in save if rec.extras.plain_error]
    if plain:
        rank, error = plain[0]
        # Megatron-Bridge 0.6.2's wrapper renames the base's keys in state_dict() but not on load: reported
        # to an implementation declaring Bridge's contract, not held against it (it saves through
        # dist_checkpointing).
        result.fail(f"at {saved_at}, a fresh model's load_state_dict(state_dict()) raised on rank {rank}: "
                    f"{error.splitlines()[0][:400]}", kind="contract", check="state_dict_roundtrip",
                    binding=ev.case.contract != "bridge")
    for rec in save:
        if rec.extras.plain_logits is not None:
            result.compare(Location(f"logits after load_state_dict(state_dict()) at {saved_at}", None, (rec.rank,)),
                           compare_tensors(rec.extras.plain_logits, rec.extras.logits, EXACT), EXACT,
                           check="state_dict_roundtrip")
    errors = [(rec.rank, rec.extras.error) for rec in save if rec.extras.error]
    if errors:
        rank, error = errors[0]
        result.fail(f"saving at {saved_at}: rank {rank} raised at {error}", kind="contract", check="checkpoint_save")
        return result
    # The file set: each adapter tensor exactly once, with its full shape: in its own entry under its name
    # (the global layer number), or in megatron's layer-stacked entry ("decoder.layers.3.x" is layer 3 of
    # "decoder.layers.x", whose global shape leads with the number of layers), not both. Routed experts'
    # adapters have no name megatron fixes (an implementation stacks them over experts, layers, or neither):
    # they are counted instead, every element of every expert's adapter once.
    shapes = _full_shapes(save)
    stored = head.saved
    experts = {p: shape for p, shape in shapes.items() if is_expert_name(p)}
    named = {p: shape for p, shape in shapes.items() if p not in experts}
    expected: dict[str, list[str]] = {}
    for pname in named:
        expected.setdefault(pname if pname in stored else stacked_key(pname), []).append(pname)
    twice = sorted(p for p in named if p in stored and stacked_key(p) != p and stacked_key(p) in stored)
    if twice:
        result.fail(f"the checkpoint saved at {saved_at} holds {_shown(twice)} twice: in its own entry and in the "
                    "layer-stacked one", kind="contract", check="checkpoint_keys")
    absent = sorted(p for key, names in expected.items() if key not in stored for p in names)
    extra = sorted(set(stored) - set(expected) - {stacked_key(p) for p in twice})
    if absent:
        result.fail(f"the checkpoint saved at {saved_at} holds no entry for {len(absent)} adapter tensor(s): "
                    f"{_shown(absent)} (their modules' sharded_state_dict does not reach them)",
                    kind="contract", check="checkpoint_keys")
    if experts:
        _expert_elements(result, saved_at, experts, {k: stored[k] for k in extra}, ev.case.contract)
    elif extra:
        result.fail(f"the checkpoint saved at {saved_at} holds {len(extra)} entr(ies) that are no adapter tensor of "
                    f"the model: {_shown(extra)} (an adapter saved twice, under another name, or a base tensor the "
                    "filter let through)", kind="contract", check="checkpoint_keys")
    for key in sorted(set(expected) & set(stored)):
        full = shapes[expected[key][0]]
        got = tuple(stored[key])
        if got[len(got) - len(full):] != full:
            result.fail(f"checkpoint entry {key} has global shape {got}; the adapter is {full} whole (its pieces "
                        "were saved as if each rank held all of it, or not at their offsets)",
                        kind="contract", check="checkpoint_shapes")
    load = ev.checkpoint_load
    broken = layout_violations("checkpoint_roundtrip", load)
    if broken is not None:
        return broken
    errors = [(rec.rank, rec.extras.error) for rec in load if rec.extras.error]
    if errors:
        rank, error = errors[0]
        result.fail(f"loading at {loaded_at} what was saved at {saved_at}: rank {rank} raised at {error}",
                    kind="contract", check="checkpoint_load")
        return result
    for rec in load:
        if rec.extras.not_loaded:
            # load_state_dict(strict=False) ignores keys the model lacks: name them, they are where those went.
            stray = tuple(getattr(rec.extras, "unexpected", ()) or ())
            where = (f"; the loaded state dict's keys the model does not have: {_shown(stray)}" if stray else "")
            result.fail(f"rank {rec.rank} at {loaded_at}: no loaded entry reached {_shown(rec.extras.not_loaded)}"
                        f"{where}", kind="contract", check="checkpoint_load")
            break
    # What was loaded is what was trained, put back together over each side's own TP groups.
    trained = replicas(save, saved_at, lambda rec: rec.extras.adapters)
    want = trained[0][1]
    for ranks, got in replicas(load, loaded_at, lambda rec: rec.extras.adapters):
        if set(got) != set(want):
            result.fail(f"the adapted parameters at {loaded_at} differ from those at {saved_at}: missing "
                        f"{sorted(set(want) - set(got))}, unexpected {sorted(set(got) - set(want))}", check="adapted_set")
            break
        for pname in sorted(got):
            result.compare(Location(f"adapter loaded at {loaded_at}, saved at {saved_at}", pname, ranks),
                           compare_tensors(got[pname], want[pname], EXACT), EXACT, check="checkpoint_adapters")
    reference_logits = save[0].extras.logits
    for rec in load:
        result.compare(Location(f"held-out logits at {loaded_at} after loading, against {saved_at}'s", None, (rec.rank,)),
                       compare_tensors(rec.extras.logits, reference_logits, FLOAT64), FLOAT64, check="checkpoint_logits")
    if not shapes and not result.findings:
        result.nothing_to_check(no_adapter_reason(save[0]) or "no adapter tensor at this layout")
    return result


def _applies(layout: Any, capabilities: Any) -> Any:
    if not getattr(capabilities, "checkpoint", True):
        return "the implementation does not declare adapter checkpoints (checkpoint)"
    return None


PROPERTY = register(Property(
    pipeline=("gpt", "moe"),
    name="checkpoint_roundtrip",
    check=check,
    needs=("checkpoint_save", "checkpoint_load"),
    families=("gpt", "moe"),
    doc="adapters trained a step at the layout, saved with megatron-core's dist_checkpointing (set_params_to_save, "
    "sharded_state_dict, adapter_key_filter) and loaded at another layout are bit for bit what was trained, every "
    "adapter once in the checkpoint, and compute the same logits; load_state_dict(state_dict()) too",
    applies=_applies,
    example_share=0.2,
    # MoE designs the targets level and the shared expert too: dense, routed-expert and shared-expert
    # adapters each have their own sharded keys and replica owners (4 -> 6 rows per layout).
    design_factors={"gpt": ("targets", "gated", "load_layout"),
                    "moe": ("expert_kind", "share_expert_adapters", "load_layout", "targets", "shared_experts")},
))
