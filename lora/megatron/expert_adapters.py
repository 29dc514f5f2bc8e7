"""lora.megatron's expert adapters: LoRA on routed experts (SPEC "Experts (MoE)"), SequentialMLP expert linears and grouped expert linears.

Expert linears live under ``...mlp.experts...`` and use the expert
tensor-parallel group (ETP), never the dense TP group (ETP may differ from
TP, e.g. TP=2, ETP=1). With EP > 1 or ETP > 1 megatron runs them with
"explicit expert comm": the expert linears communicate nothing; the token
dispatcher all-gathers the tokens over ETP before the experts (every ETP
rank sees the same tokens at full hidden width) and sums the expert outputs
over ETP after them (reduce-scatter). So a column base (fc1) returns
(tokens, out/etp) and its input gradient is a *partial* sum that the
dispatcher completes; a row base (fc2) returns a *partial* sum
(tokens, hidden). An expert adapter produces outputs shaped and summed
exactly like its base's, on the ETP group (t = ETP size, k = ETP rank):

    column base   h_part = x @ A_k.T, A_k (r/t, in)
                  h = all-gather(h_part) over ETP      (backward: own slice)
                  h = copy-to-region(h) over ETP        (backward: ALL-REDUCE)
                  out = h @ B_k.T, B_k (out/t, r) rows sharded like the base's
                  -> (tokens, out/t), like the base.
                  A's input gradient is NOT all-reduced: it is a partial sum
                  like the base's, and the dispatcher sums it over ETP.
    row base      h_part = x_k @ A_k.T, A_k (r, in/t)
                  h = all-reduce(h_part) over ETP      (backward: identity)
                  h = copy-to-region(h) over ETP        (backward: ALL-REDUCE)
                  out_k = h @ B_k.T, B_k (out/t, r)
                  -> out_k in columns [k*out/t, (k+1)*out/t) of a zero
                  (tokens, out): a partial sum over ETP like the base's.

Two known Megatron-Bridge defects are avoided here on purpose:

* without the copy-to-region after the gather/all-reduce of ``h``, the
  forward stays exact but A's gradient only sees this rank's out/t columns
  of B (dL/dh is a partial sum over ETP ranks): A's gradient misses the
  cross-rank terms. The copy's backward all-reduce completes dL/dh.
* gathering B's output of a row base to full width on every ETP rank and
  adding it to the base's partial sum would count the delta t times once
  the dispatcher sums over ETP; the block placement keeps it a partial sum.

With ETP size 1 every collective is the identity (plain math).

Sequence parallelism never applies to expert adapters (the dispatcher has
already gathered the tokens), even though the base module's config says
``sequence_parallel=True``.

Adapters per module (SPEC):

* SequentialMLP (``...experts.local_experts.<i>.linear_fc1/2``, megatron
  Column/RowParallelLinear with ``is_expert=True``): one adapter per expert,
  ``ExpertLoRALinear`` with ``adapter.linear_in.weight`` /
  ``adapter.linear_out.weight``, whatever ``share_expert_adapters`` says.
* grouped experts (``...experts.linear_fc1/2``, duck-typed: int ``num_gemms``,
  parameters ``weight0..weight{n-1}``, ``forward(x, m_splits)``):
  ``GroupedLoRALinear``. ``share_expert_adapters=True``: ONE adapter for the
  module applied to every row, ``adapter.linear_in.weight`` /
  ``adapter.linear_out.weight``, identical on every EP rank (broadcast from
  EP rank 0 at creation, its gradient summed over the EP group by a tensor
  hook). ``False``: one adapter per local expert,
  ``adapter.linear_in.weight{i}`` / ``adapter.linear_out.weight{i}``, acting
  on the rows ``m_splits`` gives local expert i.

Initialisation is the same at every layout for a given seed: every adapter
draws its FULL A then B (``init_adapter_weights``) from torch's global
generator and keeps its shard, in the order a world-size-1 walk draws:

* per-expert grouped adapters draw for every GLOBAL expert g in 0..E-1 (A
  then B each) and keep those of this EP rank (g in [e*L, (e+1)*L));
* SequentialMLP experts: the walk visits only the local experts, so
  ``lora.megatron.init.SequentialExpertInit`` snapshots the generator when
  the walk enters a SequentialMLP with EP > 1 and, once its subtree is done,
  restores the snapshot and replays the draws of all E global experts in
  order, keeping the local ones. The generator ends where a world-size-1
  walk leaves it.

Dropout uses ``apply_dropout`` on this rank's values from torch's default
generator. Masks are not made layout-independent here (under ETP > 1 the
ranks that see the same tokens may draw different masks); the harness
checks where expert dropout acts with value-keyed masks, not this stream.

Merging an expert adapter into its base weights: ``lora.megatron.merge``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from lora.megatron.init import init_adapter_weights
from lora.megatron.layout import (
    base_parallel_kind,
    expert_model_parallel_group,
    group_rank,
    group_size,
    is_gated_fc1,
    shard_rows,
)
from lora.megatron.matching import is_grouped_linear_shape
from lora.megatron.wrapper import AdapterWrapper, add_to_base_output, apply_dropout

if TYPE_CHECKING:
    from lora.megatron.init import SequentialExpertInit

__all__ = [
    "ExpertWeights",
    "ExpertAdapter",
    "ExpertLoRALinear",
    "GroupedLoRALinear",
    "is_grouped_linear",
    "is_sequential_expert_linear",
    "is_expert_wrapper",
    "grouped_parallel_kind",
    "wrap_sequential_expert",
    "wrap_grouped_expert",
]


# ------------------------------------------------------------------ recognise


def is_grouped_linear(module: object) -> bool:
    """A grouped expert linear (duck-typed; see ``lora.megatron.matching.is_grouped_linear_shape``)."""
    return is_grouped_linear_shape(module)


def is_sequential_expert_linear(module: object) -> bool:
    """A megatron Column/RowParallelLinear built for a routed expert (``is_expert=True``)."""
    return isinstance(module, nn.Module) and base_parallel_kind(module) is not None and bool(getattr(module, "is_expert", False))


def grouped_parallel_kind(module: nn.Module, full_name: str) -> str:
    """'column' or 'row' for a grouped expert linear.

    ``parallel_mode`` when it says so (harness.families.moe.model.TorchGroupedLinear, TE
    without explicit comm); megatron's TEGroupedLinear with explicit expert
    comm hands TE ``parallel_mode=None`` but marks its weights with the
    original ``partition_dim``; last, the leaf name (fc1 column, fc2 row).
    """
    mode = getattr(module, "parallel_mode", None)
    if mode in ("column", "row"):
        return mode
    w0 = module._parameters.get("weight0")
    if getattr(w0, "tensor_model_parallel", False) and getattr(w0, "partition_dim", None) in (0, 1):
        return "column" if int(w0.partition_dim) == 0 else "row"
    leaf = full_name.rsplit(".", 1)[-1]
    if leaf == "linear_fc1":
        return "column"
    if leaf == "linear_fc2":
        return "row"
    raise TypeError(
        f"lora.megatron: cannot tell whether grouped expert linear {full_name} "
        f"({type(module).__qualname__}) is column or row parallel (no parallel_mode, partition_dim or fc1/fc2 name)"
    )


def _grouped_etp_group(module: nn.Module) -> Any:
    """The expert-TP group of a grouped linear.

    megatron's TEGroupedLinear with explicit expert comm gives TE
    ``tp_group=None`` and keeps the real group as ``_tp_group``.
    """
    group = module.__dict__.get("_tp_group")
    if group is None:
        group = getattr(module, "tp_group", None)
    if group is None:
        from megatron.core import parallel_state as ps

        group = ps.get_expert_tensor_parallel_group(check_initialized=False)
    return group


# ---------------------------------------------------------------- parameters


class ExpertWeights(nn.Module):
    """A or B of an expert adapter as plain parameters: ``weight`` (one) or ``weight0..weight{n-1}``."""

    def __init__(self, shape: tuple[int, int], count: Optional[int], dtype: torch.dtype, device: Any) -> None:
        super().__init__()
        self.count = count
        names = ["weight"] if count is None else [f"weight{i}" for i in range(count)]
        for name in names:
            p = nn.Parameter(torch.empty(shape, dtype=dtype, device=device))
            # Like megatron's expert parameters: not all-reduced over the dense
            # data-parallel group (informative only; nothing here reads it).
            p.allreduce = False
            self.register_parameter(name, p)

    def get(self, i: Optional[int]) -> nn.Parameter:
        return self._parameters["weight" if i is None else f"weight{i}"]

    def all(self) -> list[nn.Parameter]:
        return list(self._parameters.values())

    def extra_repr(self) -> str:
        p = self.all()[0]
        return f"{len(self.all())} x {tuple(p.shape)}"


class ExpertAdapter(nn.Module):
    """A (``linear_in``) and B (``linear_out``) of one expert linear's LoRA, sharded over ETP.

    ``count`` None: one adapter (a SequentialMLP expert, or the shared
    adapter of a grouped linear), parameters ``weight``. ``count`` = n: one
    adapter per local expert of a grouped linear, parameters ``weight{i}``,
    adapter i acting on the rows ``m_splits`` gives expert i.
    """

    def __init__(
        self,
        *,
        kind: str,
        in_features: int,
        out_features: int,
        dim: int,
        alpha: float,
        dropout: float,
        dropout_position: str,
        lora_dtype: torch.dtype,
        etp_group: Any,
        gated: bool,
        module_name: str,
        count: Optional[int] = None,
        init_methods: tuple[str, str] = ("xavier", "zero"),
        device: Any = None,
    ) -> None:
        super().__init__()
        if kind not in ("column", "row"):
            raise ValueError(f"lora.megatron: {module_name}: expert base kind {kind!r}; expected 'column' or 'row'")
        self.kind = kind
        self.in_features = in_features  # full (unsharded) sizes
        self.out_features = out_features
        self.dim = dim
        self.alpha = alpha
        self.scale = alpha / dim
        self.dropout = dropout
        self.dropout_position = dropout_position
        self.lora_dtype = lora_dtype
        self.gated = gated and kind == "column"
        self.module_name = module_name
        self.count = count
        self.init_methods = tuple(init_methods)
        self.etp_group = etp_group
        self.etp_size = group_size(etp_group)
        self.etp_rank = group_rank(etp_group)
        t = self.etp_size
        if kind == "column" and dim % t:
            raise ValueError(
                f"lora.megatron: dim={dim} is not divisible by ETP={t} for {module_name} "
                "(a column-parallel expert base splits A along the rank dimension over the expert-TP group)"
            )
        if out_features % t:
            raise ValueError(
                f"lora.megatron: output size {out_features} is not divisible by ETP={t} for {module_name} "
                "(B's rows are split over the expert-TP group)"
            )
        if kind == "row" and in_features % t:
            raise ValueError(
                f"lora.megatron: input size {in_features} is not divisible by ETP={t} for {module_name}"
            )
        a_shape = (dim // t, in_features) if kind == "column" else (dim, in_features // t)
        b_shape = (out_features // t, dim)
        self.linear_in = ExpertWeights(a_shape, count, lora_dtype, device)
        self.linear_out = ExpertWeights(b_shape, count, lora_dtype, device)

    @property
    def per_expert(self) -> bool:
        return self.count is not None

    # -- initialisation ----------------------------------------------------
    def shard_A(self, full: torch.Tensor) -> torch.Tensor:
        if self.etp_size == 1:
            return full
        return torch.chunk(full, self.etp_size, dim=0 if self.kind == "column" else 1)[self.etp_rank]

    def shard_B(self, full: torch.Tensor) -> torch.Tensor:
        return shard_rows(full, self.etp_rank, self.etp_size, gated=self.gated)

    @torch.no_grad()
    def load_full(self, a_full: torch.Tensor, b_full: torch.Tensor, i: Optional[int] = None) -> None:
        """Set adapter ``i`` (None: the one adapter) from FULL A (r, in) and B (out, r); keeps this rank's shards."""
        a, b = self.linear_in.get(i), self.linear_out.get(i)
        a.copy_(self.shard_A(a_full).to(a.dtype))
        b.copy_(self.shard_B(b_full).to(b.dtype))

    def draw_full(self, generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One adapter's full A then B from the SPEC's draw (torch's global generator by default)."""
        a_method, b_method = self.init_methods
        return init_adapter_weights(self.out_features, self.in_features, self.dim, a_method, b_method, generator=generator)

    # -- forward -----------------------------------------------------------
    def _rank_in(self, h_part: torch.Tensor) -> torch.Tensor:
        """A's output over ETP: column base gathers r/t -> r, row base sums the partial products.

        Forward only the collective; its backward hands A the slice (column)
        or the whole (row) of dL/dh, with no further reduction (A's input
        gradient stays a partial sum, as the base's, for the dispatcher).
        """
        if self.etp_size == 1:
            return h_part
        from megatron.core.tensor_parallel import mappings

        if self.kind == "column":
            return mappings.gather_from_tensor_model_parallel_region(h_part, group=self.etp_group)
        return mappings.reduce_from_tensor_model_parallel_region(h_part, group=self.etp_group)

    def _complete_rank_grad(self, h: torch.Tensor) -> torch.Tensor:
        """Forward identity, backward all-reduce over ETP: dL/dh from B's out/t shard is partial; sum it."""
        if self.etp_size == 1:
            return h
        from megatron.core.tensor_parallel import mappings

        return mappings.copy_to_tensor_model_parallel_region(h, group=self.etp_group)

    def _to_base_layout(self, out: torch.Tensor) -> torch.Tensor:
        """B's (tokens, out/t) output in the base's layout.

        Column base: as is. Row base: a partial sum over ETP like the base's,
        i.e. this rank's block of a zero (tokens, out); the dispatcher's sum
        over ETP assembles the full delta exactly once.
        """
        if self.kind == "column" or self.etp_size == 1:
            return out
        width = out.shape[-1]
        return F.pad(out, (self.etp_rank * width, (self.etp_size - 1 - self.etp_rank) * width))

    def forward(self, x: torch.Tensor, m_splits: Any = None) -> torch.Tensor:
        x = x.to(self.lora_dtype)
        if self.dropout_position == "pre":
            x = apply_dropout(x, self.dropout, self.training)
        if not self.per_expert:
            h = self._complete_rank_grad(self._rank_in(x @ self.linear_in.get(None).t()))
            out = h @ self.linear_out.get(None).t()
        else:
            splits = _split_sizes(m_splits, self.count, x.shape[0], self.module_name)
            blocks = torch.split(x, splits, dim=0)
            # One collective for all experts: A_i on each expert's rows, then
            # the ETP step on the concatenation, then B_i on each block.
            h_part = torch.cat([blk @ self.linear_in.get(i).t() for i, blk in enumerate(blocks)], dim=0)
            h = self._complete_rank_grad(self._rank_in(h_part))
            out = torch.cat(
                [blk @ self.linear_out.get(i).t() for i, blk in enumerate(torch.split(h, splits, dim=0))], dim=0
            )
        out = self._to_base_layout(out)
        if self.dropout_position == "post":
            out = apply_dropout(out, self.dropout, self.training)
        return out * self.scale

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Any = None) -> dict[str, Any]:
        """megatron-core's distributed-checkpoint view of this adapter: every tensor a piece of its full,
        layout-independent tensor (``expert_entries``), keyed by the parameter's state-dict name."""
        from lora.megatron.expert_checkpoint import expert_entries

        return expert_entries(self, prefix, sharded_offsets, metadata)

    def extra_repr(self) -> str:
        per = f", experts={self.count}" if self.per_expert else ""
        return (
            f"{self.kind}, in={self.in_features}, out={self.out_features}, dim={self.dim}, alpha={self.alpha}, "
            f"etp={self.etp_size}{per}, dropout={self.dropout}, dropout_position={self.dropout_position!r}"
        )


def _split_sizes(m_splits: Any, count: int, rows: int, where: str) -> list[int]:
    if m_splits is None:
        raise ValueError(f"lora.megatron: {where}: a per-expert grouped adapter needs m_splits (tokens per expert)")
    splits = [int(v) for v in (m_splits.reshape(-1).tolist() if torch.is_tensor(m_splits) else m_splits)]
    if len(splits) != count or any(v < 0 for v in splits) or sum(splits) != rows:
        raise ValueError(f"lora.megatron: {where}: m_splits {splits} do not split {rows} rows over {count} experts")
    return splits


# ------------------------------------------------------------------ wrappers


class ExpertLoRALinear(AdapterWrapper):
    """A SequentialMLP expert's Column/RowParallelLinear (``to_wrap``) plus its ``ExpertAdapter``
    (``AdapterWrapper``'s forward: base output plus ``adapter(x)``, the base alone when switched off)."""


class GroupedLoRALinear(AdapterWrapper):
    """A grouped expert linear (``to_wrap``) plus its shared or per-expert ``ExpertAdapter``."""

    def forward(self, x: torch.Tensor, m_splits: Any, *args: Any, **kwargs: Any) -> Any:
        if not self.adapter_on:
            return self.to_wrap(x, m_splits, *args, **kwargs)
        return add_to_base_output(self.to_wrap(x, m_splits, *args, **kwargs), self.adapter(x, m_splits))


def is_expert_wrapper(module: object) -> bool:
    return isinstance(module, (ExpertLoRALinear, GroupedLoRALinear))


# ------------------------------------------------------------- construction


def _lora_dtype(cfg: Any, weight: torch.Tensor) -> torch.dtype:
    if cfg.lora_dtype is not None:
        return cfg.lora_dtype
    return weight.dtype if weight.is_floating_point() else torch.float32


def wrap_sequential_expert(cfg: Any, module: nn.Module, full_name: str, kind: str, init: "SequentialExpertInit") -> ExpertLoRALinear:
    """One adapter for a SequentialMLP expert's linear (``cfg`` is the LoRA config)."""
    adapter = ExpertAdapter(
        kind=kind,
        in_features=module.input_size,
        out_features=module.output_size,
        dim=cfg.adapter_rank(module, full_name),
        alpha=cfg.alpha,
        dropout=cfg.dropout,
        dropout_position=cfg.dropout_position,
        lora_dtype=_lora_dtype(cfg, module.weight),
        etp_group=module.tp_group,
        gated=is_gated_fc1(module, full_name),
        module_name=full_name,
        init_methods=(cfg.lora_A_init_method, cfg.lora_B_init_method),
        device=module.weight.device,
    )
    # Drawn in walk order now; with EP > 1 the SequentialMLP's draws are
    # replayed in global expert order once its subtree is done.
    adapter.load_full(*adapter.draw_full())
    init.register(full_name, adapter)
    return ExpertLoRALinear(module, adapter)


def wrap_grouped_expert(cfg: Any, module: nn.Module, full_name: str) -> GroupedLoRALinear:
    """A shared (share_expert_adapters) or per-expert adapter for a grouped expert linear."""
    if getattr(getattr(module, "config", None), "use_transformer_engine_op_fuser", False):
        # TEGroupedMLP's fused path calls TE's fused ops on the weights
        # directly and would skip the wrapper (and the adapter) silently.
        raise ValueError(
            f"lora.megatron: {full_name}: grouped experts built with use_transformer_engine_op_fuser=True "
            "run a fused implementation that bypasses adapter wrappers; build the model without it"
        )
    kind = grouped_parallel_kind(module, full_name)
    etp_group = _grouped_etp_group(module)
    t = group_size(etp_group)
    n = module.num_gemms
    w0 = module._parameters["weight0"]
    out_local, in_local = w0.shape
    out_full, in_full = (out_local * t, in_local) if kind == "column" else (out_local, in_local * t)
    shared = bool(cfg.share_expert_adapters)
    adapter = ExpertAdapter(
        kind=kind,
        in_features=in_full,
        out_features=out_full,
        dim=cfg.adapter_rank(module, full_name),
        alpha=cfg.alpha,
        dropout=cfg.dropout,
        dropout_position=cfg.dropout_position,
        lora_dtype=_lora_dtype(cfg, w0),
        etp_group=etp_group,
        gated=is_gated_fc1(module, full_name),
        module_name=full_name,
        count=None if shared else n,
        init_methods=(cfg.lora_A_init_method, cfg.lora_B_init_method),
        device=w0.device,
    )
    ep_group = expert_model_parallel_group()
    ep_size, ep_rank = group_size(ep_group), group_rank(ep_group)
    if shared:
        adapter.load_full(*adapter.draw_full())
        if ep_size > 1:
            _broadcast_from_ep_rank0(adapter, ep_group)
            for p in (adapter.linear_in.get(None), adapter.linear_out.get(None)):
                p.register_hook(_ep_grad_sum(ep_group))
    else:
        # Global expert g = ep_rank * n + i; draw every global expert in order
        # (what a world-size-1 walk draws) and keep the local ones.
        for g in range(ep_size * n):
            a_full, b_full = adapter.draw_full()
            e, i = divmod(g, n)
            if e == ep_rank:
                adapter.load_full(a_full, b_full, i)
    return GroupedLoRALinear(module, adapter)


@torch.no_grad()
def _broadcast_from_ep_rank0(adapter: ExpertAdapter, ep_group: Any) -> None:
    src = torch.distributed.get_global_rank(ep_group, 0)
    for p in (adapter.linear_in.get(None), adapter.linear_out.get(None)):
        buf = p.detach().contiguous().clone()
        torch.distributed.broadcast(buf, src=src, group=ep_group)
        p.copy_(buf)


def _ep_grad_sum(ep_group: Any):
    """A tensor hook summing a shared adapter's gradient over the EP group.

    A tensor hook (not a post-accumulate-grad hook) sees only this backward's
    gradient, so gradients accumulated over micro-batches are not summed
    twice. Every EP rank runs it once per backward (empty expert inputs
    still give a zero gradient), so the collectives match up.
    """

    def hook(grad: torch.Tensor) -> torch.Tensor:
        total = grad.contiguous().clone()
        torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM, group=ep_group)
        return total

    return hook
