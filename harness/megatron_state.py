"""megatron-core's parallel state on this rank: bring it into a layout, remember what was built, tear it down.

``ParallelLayout.initialize_megatron`` (``harness.layouts``) calls
``initialize``; building megatron's groups costs tens of milliseconds
each, so a call for the layout parallel_state already holds only reseeds.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

from harness.layouts import CP_SIZE, GROUP_SPECS, MEGATRON_ORDER, LayoutError

__all__ = ["initialize", "destroy_megatron", "current_megatron_groups", "gloo_groups_as_built"]

#: megatron's gloo copies of the data-parallel groups -> the group each copies (parallel_state globals).
_GLOO_COPIES = {
    "_DATA_PARALLEL_GROUP_GLOO": "_DATA_PARALLEL_GROUP",
    "_DATA_PARALLEL_GROUP_WITH_CP_GLOO": "_DATA_PARALLEL_GROUP_WITH_CP",
    "_INTRA_PARTIAL_DATA_PARALLEL_GROUP_WITH_CP_GLOO": "_INTRA_PARTIAL_DATA_PARALLEL_GROUP_WITH_CP",
    "_EXPERT_DATA_PARALLEL_GROUP_GLOO": "_EXPERT_DATA_PARALLEL_GROUP",
    "_INTRA_PARTIAL_EXPERT_DATA_PARALLEL_GROUP_GLOO": "_INTRA_PARTIAL_EXPERT_DATA_PARALLEL_GROUP",
}


def initialize(layout: Any, world_size: int | None = None, *, seed: int | None = None,
               create_gloo_process_groups: bool | None = None) -> bool:
    """``ParallelLayout.initialize_megatron``: see there."""
    global _built
    import torch.distributed as dist
    from megatron.core import parallel_state

    if not dist.is_initialized():
        raise RuntimeError(
            "initialize_megatron needs an initialised torch.distributed default group; "
            "call torch.distributed.init_process_group first (the harness rank runner does)"
        )
    actual_world = dist.get_world_size()
    if world_size is None:
        world_size = actual_world
    elif world_size != actual_world:
        raise LayoutError(
            f"world_size={world_size} was asked for but the torch.distributed world has "
            f"{actual_world} ranks"
        )
    layout._require_fit(world_size)
    if create_gloo_process_groups is None:
        create_gloo_process_groups = str(dist.get_backend()) != "gloo"

    key = (layout.tp, CP_SIZE, layout.etp_size, layout.ep, layout.pp, layout.vpp, world_size, create_gloo_process_groups)
    cached = _built
    built = not (
        cached is not None
        and cached.key == key
        and cached.world_group is dist.group.WORLD
        and parallel_state.model_parallel_is_initialized()
        # someone else re-initialising parallel_state replaces this group
        and parallel_state.get_tensor_model_parallel_group(check_initialized=False)
        is cached.tp_group
    )
    if built:
        _built = None
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        _destroy_recorded_groups()
        with _recording_new_groups():
            parallel_state.initialize_model_parallel(
                tensor_model_parallel_size=layout.tp,
                pipeline_model_parallel_size=layout.pp,
                virtual_pipeline_model_parallel_size=layout.vpp,
                context_parallel_size=CP_SIZE,
                expert_model_parallel_size=layout.ep,
                expert_tensor_parallel_size=layout.etp_size,
                order=MEGATRON_ORDER,
                create_gloo_process_groups=create_gloo_process_groups,
            )
        _built = _BuiltState(
            key=key,
            world_group=dist.group.WORLD,
            tp_group=parallel_state.get_tensor_model_parallel_group(),
        )
    if seed is not None:
        _seed_model_parallel(seed)
    return built


@dataclass(frozen=True)
class _BuiltState:
    key: tuple
    world_group: Any  # torch.distributed default group the groups were built on
    tp_group: Any  # the tensor parallel group built, to notice re-initialisation by others


_built: _BuiltState | None = None


# Process groups megatron created for the current layout. megatron's
# destroy_model_parallel only drops its references; a gloo group keeps its
# threads until destroyed, so a long-lived rank that switches layouts would
# pile up hundreds of threads (seen: ~900 per rank) and crawl. We destroy
# what was created when the layout changes.
_recorded_groups: list = []


@contextlib.contextmanager
def _recording_new_groups() -> Iterator[None]:
    import torch.distributed as dist

    original = dist.new_group

    def recording(*args: Any, **kwargs: Any) -> Any:
        group = original(*args, **kwargs)
        _recorded_groups.append(group)
        return group

    dist.new_group = recording
    try:
        yield
    finally:
        dist.new_group = original


def _destroy_recorded_groups() -> None:
    import torch.distributed as dist

    groups, _recorded_groups[:] = list(_recorded_groups), []
    for group in groups:
        if group is None or group is dist.GroupMember.NON_GROUP_MEMBER or group is dist.group.WORLD:
            continue
        try:
            dist.destroy_process_group(group)
        except Exception:  # noqa: BLE001 - already gone (e.g. the world was torn down)
            pass


def destroy_megatron() -> None:
    """Destroy megatron-core's parallel_state groups and forget the cached layout."""
    global _built
    from megatron.core import parallel_state

    _built = None
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    _destroy_recorded_groups()


def current_megatron_groups() -> dict[str, list[int]]:
    """The global ranks of the calling rank's megatron-core groups, per kind in GROUP_KINDS.

    Compare with ``layout.groups_of(rank, world_size)`` to check megatron built
    what this module expects.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    out = {}
    for kind, (_gen, _axes, getter, kwargs) in GROUP_SPECS.items():
        group = getattr(parallel_state, getter)(**kwargs)
        out[kind] = list(dist.get_process_group_ranks(group))
    return out


def _seed_model_parallel(seed: int) -> None:
    # The RNG tracker belongs to harness.cpu; this is only the hook.
    try:
        from harness.cpu import seed_model_parallel
    except ImportError as exc:
        raise ImportError(
            "ParallelLayout.initialize_megatron(seed=...) needs harness.cpu.seed_model_parallel "
            f"(megatron's model-parallel RNG seeding on CPU), which could not be imported: {exc}"
        ) from exc
    seed_model_parallel(seed)


@contextlib.contextmanager
def gloo_groups_as_built() -> Iterator[None]:
    """For a while, megatron's gloo copies of the data-parallel groups are the groups themselves.

    megatron-core's optimizer reads ``get_data_parallel_group_gloo`` (and the
    expert one) when it is built, even where the groups already are gloo
    groups; ``initialize`` builds no copies on a gloo world (they would
    double the cost of every initialisation). On a gloo world this block
    hands megatron the groups as the copies, and puts the empty slots back
    after (megatron's ``destroy_model_parallel`` destroys copies it holds;
    an alias there would destroy the group itself). Where copies exist (a
    non-gloo world) nothing changes.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    aliased = []
    if dist.is_initialized() and str(dist.get_backend()) == "gloo":
        for copy, group in _GLOO_COPIES.items():
            if getattr(ps, copy, None) is None and getattr(ps, group, None) is not None:
                setattr(ps, copy, getattr(ps, group))
                aliased.append(copy)
    try:
        yield
    finally:
        for copy in aliased:
            setattr(ps, copy, None)
