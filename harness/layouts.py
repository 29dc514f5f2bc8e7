"""The parallel layouts the harness runs LoRA at, and what each one means.

One job: say, for a ``ParallelLayout`` (tp, ep, etp, pp, sp), whether
megatron-core can lay it out, in which world sizes, which ranks megatron puts
in each process group (computed here by plain arithmetic, independently of
megatron), and bring megatron-core's ``parallel_state`` into that layout in
an already initialised torch.distributed process.

Rules taken from megatron-core 0.19.2 (``parallel_state.initialize_model_parallel``
and ``ModelParallelConfig.__post_init__``):

* Dense ranks are a grid tp x cp x dp x pp and expert ranks a grid
  etp x ep x edp x pp over the same world, both numbered in the order
  "tp-cp-ep-dp-pp" (first axis varies fastest; the dense grid has ep = 1, the
  expert grid has cp = 1).  So the world must be divisible by tp*cp*pp and by
  etp*ep*pp; the smallest such world is pp * lcm(tp*cp, etp*ep).
* No size has to be a power of two; megatron only asks for divisibility.
  (Divisibility of heads, hidden sizes and expert counts is a model matter.)
* ``sequence_parallel`` with tensor parallel size 1 is rejected by
  ``ModelParallelConfig`` ("Cannot use sequence parallelism without tensor
  parallelism"), so a layout with sp and tp == 1 is invalid here too.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from itertools import product
from typing import Any
from harness.errors import LayoutError

__all__ = [
    "GROUP_KINDS",
    "LayoutError",
    "ParallelLayout",
    "current_megatron_groups",
    "destroy_megatron",
    "powers_of_two",
]

# Megatron's rank order for both of its rank generators.  Passed explicitly to
# initialize_model_parallel so the arithmetic below and megatron cannot drift
# apart if a later version changes the default.
MEGATRON_ORDER = "tp-cp-ep-dp-pp"

# Context parallelism is not a field of ParallelLayout (the harness does not
# exercise it); the arithmetic keeps it as an axis of size 1 so the groups
# that megatron builds with it ("dp-cp", "tp-cp", ...) are still described.
CP_SIZE = 1


# kind -> (generator, axes of that generator's grid the group spans,
#          parallel_state getter returning the caller's group, getter kwargs).
# "dense" is megatron's decoder rank generator, "expert" its expert one; on the
# expert grid "tp" is etp and "dp" is edp, hence the renamed kinds.
GROUP_SPECS: dict[str, tuple[str, tuple[str, ...], str, dict[str, Any]]] = {
    "tp": ("dense", ("tp",), "get_tensor_model_parallel_group", {}),
    "cp": ("dense", ("cp",), "get_context_parallel_group", {}),
    "dp": ("dense", ("dp",), "get_data_parallel_group", {"with_context_parallel": False}),
    "dp-cp": ("dense", ("dp", "cp"), "get_data_parallel_group", {"with_context_parallel": True}),
    "pp": ("dense", ("pp",), "get_pipeline_model_parallel_group", {}),
    # megatron's "model parallel" group
    "tp-pp": ("dense", ("tp", "pp"), "get_model_parallel_group", {}),
    "tp-cp": ("dense", ("tp", "cp"), "get_tensor_and_context_parallel_group", {}),
    "tp-dp": ("dense", ("tp", "dp"), "get_tensor_and_data_parallel_group", {}),
    "tp-dp-cp": (
        "dense",
        ("tp", "dp", "cp"),
        "get_tensor_and_data_parallel_group",
        {"with_context_parallel": True},
    ),
    "ep": ("expert", ("ep",), "get_expert_model_parallel_group", {}),
    "etp": ("expert", ("tp",), "get_expert_tensor_parallel_group", {}),
    "edp": ("expert", ("dp",), "get_expert_data_parallel_group", {}),
    # megatron's "expert tensor and model parallel" group (its 'tp-ep' token)
    "etp-ep": ("expert", ("tp", "ep"), "get_expert_tensor_and_model_parallel_group", {}),
    "etp-ep-pp": ("expert", ("tp", "ep", "pp"), "get_expert_tensor_model_pipeline_parallel_group", {}),
}

#: The group kinds ``expected_groups`` and ``groups_of`` return, in a fixed order.
GROUP_KINDS: tuple[str, ...] = tuple(GROUP_SPECS)


def _orthogonal_groups(grid: list[tuple[str, int]], axes: tuple[str, ...]) -> list[list[int]]:
    """Rank groups of a mixed-radix rank grid that vary exactly along ``axes``.

    ``grid`` lists (axis, size) with the first axis varying fastest, so a rank
    is sum(index[a] * stride[a]) with stride = product of the sizes before a.
    A group holds all ranks that agree on every other axis; ranks within a
    group and the groups themselves are both listed with the first axis
    varying fastest, which is the order megatron lists them in.
    """
    strides: dict[str, int] = {}
    stride = 1
    for name, size in grid:
        strides[name] = stride
        stride *= size
    inside = [(size, strides[name]) for name, size in grid if name in axes]
    outside = [(size, strides[name]) for name, size in grid if name not in axes]

    def offsets(dims: list[tuple[int, int]]) -> list[int]:
        # itertools.product varies its last argument fastest; reverse so the
        # first (lowest-stride) axis does.
        return [
            sum(i * d for i, (_, d) in zip(reversed(idx), dims))
            for idx in product(*(range(s) for s, _ in reversed(dims)))
        ]

    members = offsets(inside)
    return [[base + m for m in members] for base in offsets(outside)]


def _grids(tp: int, cp: int, etp: int, ep: int, pp: int, world_size: int) -> dict[str, list[tuple[str, int]]]:
    """Megatron's dense and expert rank grids, axes in MEGATRON_ORDER."""
    dp = world_size // (tp * cp * pp)
    edp = world_size // (etp * ep * pp)
    return {
        "dense": [("tp", tp), ("cp", cp), ("ep", 1), ("dp", dp), ("pp", pp)],
        "expert": [("tp", etp), ("cp", 1), ("ep", ep), ("dp", edp), ("pp", pp)],
    }


def _expected_groups(
    tp: int, cp: int, etp: int, ep: int, pp: int, world_size: int
) -> dict[str, list[list[int]]]:
    """Every group kind for given sizes; the caller has checked the world fits.

    Separate from ParallelLayout so tests can check the arithmetic at pp and
    cp values the layout type does not accept yet.
    """
    grids = _grids(tp, cp, etp, ep, pp, world_size)
    return {
        kind: _orthogonal_groups(grids[gen], axes)
        for kind, (gen, axes, _getter, _kw) in GROUP_SPECS.items()
    }


def _check_size(name: str, value: Any) -> None:
    # bool is an int subclass; True as a parallel size is a bug, not a 1.
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LayoutError(f"ParallelLayout.{name}={value!r} is invalid: sizes must be integers >= 1")


@dataclass(frozen=True, eq=False)
class ParallelLayout:
    """A megatron-core parallel layout: how one model is split over ranks.

    ``etp=None`` means "same as tp" (megatron's default); ``etp_size`` resolves
    it.  Two layouts are equal when they resolve to the same sizes, so
    ``ParallelLayout(tp=2) == ParallelLayout(tp=2, etp=2)``.
    """

    tp: int = 1
    ep: int = 1
    etp: int | None = None
    pp: int = 1
    sp: bool = False
    # Virtual pipeline stages (model chunks) per pipeline rank; None: one
    # chunk per stage (no interleaving). Only with pp > 1, as megatron's
    # interleaved schedule needs.
    vpp: int | None = None
    # Dense data-parallel size; None: the smallest the other sizes allow
    # (``min_world_size``). Set it to run a layout in a bigger world, e.g.
    # TP=2, EP=2, ETP=1 with data_parallel=2 (world 4, expert data parallel 2).
    data_parallel: int | None = None

    def __post_init__(self) -> None:
        self.validate()
        if self.vpp == 1:
            # One chunk per stage is no virtual pipeline: one name per layout.
            object.__setattr__(self, "vpp", None)
        if self.data_parallel is not None and self.data_parallel * self.tp * CP_SIZE == math.lcm(self.tp * CP_SIZE, self.etp_size * self.ep):
            # The smallest data parallelism is the default: one name per layout.
            object.__setattr__(self, "data_parallel", None)

    # -- validity -----------------------------------------------------------

    def validate(self) -> None:
        """Raise LayoutError naming the field, its value and the rule it breaks."""
        _check_size("tp", self.tp)
        _check_size("ep", self.ep)
        if self.etp is not None:
            _check_size("etp", self.etp)
        _check_size("pp", self.pp)
        if self.data_parallel is not None:
            _check_size("data_parallel", self.data_parallel)
            world = self.tp * CP_SIZE * self.pp * self.data_parallel
            if world % (self.etp_size * self.ep * self.pp):
                raise LayoutError(
                    f"ParallelLayout.data_parallel={self.data_parallel} is invalid: the world tp*data_parallel*pp = {world} must be divisible "
                    f"by etp*ep*pp = {self.etp_size}*{self.ep}*{self.pp} (megatron's expert grid)"
                )
        if not isinstance(self.sp, bool):
            raise LayoutError(f"ParallelLayout.sp={self.sp!r} is invalid: sp must be True or False")
        if self.vpp is not None:
            _check_size("vpp", self.vpp)
            if self.pp == 1:
                raise LayoutError(
                    f"ParallelLayout.vpp={self.vpp} is invalid with pp=1: virtual pipeline stages "
                    "need pipeline parallelism (pp > 1; megatron's interleaved schedule)"
                )
        if self.sp and self.tp == 1:
            # Same rule as megatron-core's ModelParallelConfig, which raises
            # "Cannot use sequence parallelism without tensor parallelism".
            raise LayoutError(
                "ParallelLayout.sp=True is invalid with tp=1: sequence parallelism requires "
                "tp > 1 (megatron-core's ModelParallelConfig rejects it)"
            )

    @property
    def etp_size(self) -> int:
        """Expert tensor parallel size, with None resolved to tp as megatron does."""
        return self.tp if self.etp is None else self.etp

    @property
    def chunks(self) -> int:
        """Model chunks per pipeline rank: vpp, or 1 without virtual stages."""
        return self.vpp or 1

    @property
    def stages(self) -> int:
        """Pipeline stages the model's layers are split into: pp * vpp (megatron's division rule)."""
        return self.pp * self.chunks

    @property
    def moe_trainable(self) -> bool:
        """Whether megatron's MoELayer will run this layout in training mode.

        MoELayer.forward raises in training when the attention TP group has
        more than one rank and sequence parallelism is off.
        """
        return self.tp == 1 or self.sp

    # -- world sizes --------------------------------------------------------

    @property
    def min_world_size(self) -> int:
        """Smallest world megatron can lay this out in: pp * lcm(tp*cp, etp*ep), or tp*cp*pp*dp when dp is set."""
        if self.data_parallel is not None:
            return self.tp * CP_SIZE * self.pp * self.data_parallel
        return self.pp * math.lcm(self.tp * CP_SIZE, self.etp_size * self.ep)

    def fits(self, world_size: int) -> bool:
        """Whether megatron can lay this out in a world of ``world_size`` ranks."""
        _check_world(world_size)
        return world_size % self.min_world_size == 0

    def _require_fit(self, world_size: int) -> None:
        if not self.fits(world_size):
            raise LayoutError(
                f"layout {self} does not fit world_size={world_size}: the world must be a "
                f"multiple of {self.min_world_size} = pp*lcm(tp*cp, etp*ep) = "
                f"{self.pp}*lcm({self.tp}*{CP_SIZE}, {self.etp_size}*{self.ep})"
            )

    def dp(self, world_size: int) -> int:
        """Data parallel size of the dense part in a world of ``world_size`` ranks."""
        self._require_fit(world_size)
        return world_size // (self.tp * CP_SIZE * self.pp)

    def expert_dp(self, world_size: int) -> int:
        """Expert data parallel size in a world of ``world_size`` ranks."""
        self._require_fit(world_size)
        return world_size // (self.etp_size * self.ep * self.pp)

    # -- rank groups --------------------------------------------------------

    def expected_groups(self, world_size: int) -> dict[str, list[list[int]]]:
        """The rank groups megatron-core builds for this layout, per kind in GROUP_KINDS.

        Each kind's groups partition range(world_size) and are listed in
        megatron's order.
        """
        self._require_fit(world_size)
        return _expected_groups(self.tp, CP_SIZE, self.etp_size, self.ep, self.pp, world_size)

    def groups_of(self, rank: int, world_size: int) -> dict[str, list[int]]:
        """The group containing ``rank``, per kind in GROUP_KINDS."""
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise LayoutError(f"rank={rank!r} is not a rank of a world of size {world_size}")
        return {
            kind: next(g for g in groups if rank in g)
            for kind, groups in self.expected_groups(world_size).items()
        }

    # -- megatron -----------------------------------------------------------

    def model_parallel_config_kwargs(self) -> dict[str, Any]:
        """The ModelParallelConfig / TransformerConfig fields this layout sets."""
        return {
            "tensor_model_parallel_size": self.tp,
            "pipeline_model_parallel_size": self.pp,
            "virtual_pipeline_model_parallel_size": self.vpp,
            "expert_model_parallel_size": self.ep,
            "expert_tensor_parallel_size": self.etp_size,
            "sequence_parallel": self.sp,
        }

    def initialize_megatron(
        self,
        world_size: int | None = None,
        *,
        seed: int | None = None,
        create_gloo_process_groups: bool | None = None,
    ) -> bool:
        """Bring megatron-core's parallel_state into this layout; return whether groups were built.

        The torch.distributed default group must already be initialised.
        Building megatron's groups costs tens of milliseconds each, so a call
        for the layout parallel_state already holds (built by this function,
        on the same default group) only reseeds; otherwise the old groups are
        destroyed and new ones built.  ``sp`` is not a parallel_state matter
        (it lives in TransformerConfig), so layouts differing only in sp share
        groups.

        ``create_gloo_process_groups=None`` creates megatron's extra gloo
        copies of the data parallel groups only when the world's backend is
        not gloo: on a gloo world its ordinary groups already are gloo groups,
        and the copies (read only by the distributed optimizer) would double
        the cost of every initialisation.

        ``seed``, when given, is handed to ``harness.cpu.seed_model_parallel``
        (megatron's model-parallel RNG tracker), on every call.
        """
        from harness.megatron_state import initialize

        return initialize(self, world_size, seed=seed, create_gloo_process_groups=create_gloo_process_groups)

    # -- names --------------------------------------------------------------

    def describe(self) -> str:
        """Short stable name, e.g. "tp2-ep1-etp2-pp1-sp"; used as test id and report key."""
        name = f"tp{self.tp}-ep{self.ep}-etp{self.etp_size}-pp{self.pp}"
        if self.vpp is not None:
            name += f"-vpp{self.vpp}"
        if self.data_parallel is not None:
            name += f"-dp{self.data_parallel}"
        return name + "-sp" if self.sp else name

    __str__ = describe

    @classmethod
    def parse(cls, text: str) -> ParallelLayout:
        """Inverse of describe().  Parts after tp may be left out: "tp2-sp", "tp2-ep2"."""
        m = _NAME.fullmatch(text.strip()) if isinstance(text, str) else None
        if m is None:
            raise LayoutError(
                f"cannot parse layout {text!r}: expected 'tp<N>[-ep<N>][-etp<N>][-pp<N>[-vpp<N>]][-dp<N>][-sp]', "
                "e.g. 'tp2-ep1-etp2-pp1-sp'"
            )
        tp, ep, etp, pp, vpp, dp, sp = m.groups()
        tp = int(tp)
        etp_value = None if etp is None or int(etp) == tp else int(etp)
        return cls(
            tp=tp,
            ep=1 if ep is None else int(ep),
            etp=etp_value,
            pp=1 if pp is None else int(pp),
            vpp=None if vpp is None else int(vpp),
            sp=sp is not None,
            data_parallel=None if dp is None else int(dp),
        )

    # -- identity -----------------------------------------------------------

    @property
    def _key(self) -> tuple:
        # dp=None and an explicit dp equal to the smallest one are the same layout.
        return (self.tp, self.ep, self.etp_size, self.pp, self.chunks, self.sp, self.min_world_size)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ParallelLayout):
            return NotImplemented
        return self._key == other._key

    def __hash__(self) -> int:
        return hash(self._key)

    @property
    def sort_key(self) -> tuple:
        """Cheapest first: by smallest world, then tp, ep, etp, pp, vpp, sp."""
        return (self.min_world_size, *self._key[:-1])


_NAME = re.compile(r"tp(\d+)(?:-ep(\d+))?(?:-etp(\d+))?(?:-pp(\d+))?(?:-vpp(\d+))?(?:-dp(\d+))?(-sp)?")


def _check_world(world_size: Any) -> None:
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise LayoutError(f"world_size={world_size!r} is invalid: it must be an integer >= 1")


def destroy_megatron() -> None:
    """Tear down megatron-core's parallel state and the groups this module built (``harness.megatron_state``)."""
    from harness.megatron_state import destroy_megatron as destroy

    destroy()


def current_megatron_groups() -> dict[str, list[int]]:
    """This rank's megatron-core process groups, by kind (``harness.megatron_state``)."""
    from harness.megatron_state import current_megatron_groups as current

    return current()


# -- the layout set ----------------------------------------------------------


def powers_of_two(n: int) -> list[int]:
    """1, 2, 4, ... up to ``n``: the sizes a layout set runs for a maximum ``n`` (``harness.settings.layout_set``)."""
    return [1 << k for k in range(n.bit_length()) if 1 << k <= n]
