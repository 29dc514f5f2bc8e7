"""lora.megatron's dense adapters: LoRA on megatron-core column/row parallel linears (tensor parallel) and on plain nn.Linear.

A parallel base gets one wrapper, ``ParallelLoRALinear``, holding the base
layer (``to_wrap``) and a ``ParallelLinearAdapter`` (``adapter.linear_in`` =
A, ``adapter.linear_out`` = B), laid out per the TP table of harness/SPEC.md:

    base      A (linear_in)                   B (linear_out)
    column    column-parallel (r/t, in),      column-parallel (out/t, r),
              output gathered to r            not gathered: output (.., out/t)
    row       row-parallel (r, in/t),         column-parallel (out/t, r),
              output all-reduced              output gathered: (.., out)

The adapter layers are real megatron-core linears on the base layer's own TP
group, so their collectives (copy-to-region, gather, all-reduce) carry the
gradients exactly as megatron's do.

Sequence parallelism (the base layer's ``sequence_parallel`` is set, TP > 1):
activations outside the TP region are sharded along the sequence, (s/t, b, h).

* column base: the base all-gathers its input along the sequence before its
  matmul; the adapter does the same, ``gather_from_sequence_parallel_region``
  before A. A then skips its own copy-to-region (``disable_grad_reduce``): the
  gather's backward reduce-scatters A's partial input gradients, which both
  sums them over the r/t shards and hands each rank its sequence shard (as the
  base's own backward does). Output (s, b, out/t), like the base's.
* row base: the base reduce-scatters its partial sums to (s/t, b, out). The
  adapter's B output is already the full sum, gathered to (s, b, out) and
  identical on every rank, so it is *split* along the sequence
  (``scatter_to_sequence_parallel_region``: forward split, backward
  all-gather), not reduce-scattered, which would multiply it by t.
* row base with ``a2a``: B's output is left split along the hidden dimension,
  (s, b, out/t), and one all-to-all turns it into (s/t, b, out).

Dropout under sequence parallelism always acts on values that differ per TP
rank (a sequence shard or a hidden shard), so it draws from the
model-parallel stream: a column base's "pre" dropout acts on the sequence
shard before the gather, a row base's "post" dropout after the scatter.

Initialisation is drawn over the full, unsharded matrix (the SPEC's draw:
float32 on the CPU from torch's global generator, A then B, walk order) and
then sliced, so a given seed yields the same adapter at every layout, and
the same as the reference's: B's rows are sliced
exactly like the base weight's rows (including the gate/up split of a gated
``linear_fc1``), A is sliced along r (column base) or along ``in`` (row base).

An unsharded ``torch.nn.Linear`` gets a ``LoRALinear`` holding a plain
``LinearAdapter``. ``wrap_linear`` and ``wrap_parallel`` build either from
the LoRA config (``lora.megatron.lora.LoRA`` picks which).
"""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch
from torch import nn

from lora.megatron.init import init_adapter_weights
from lora.megatron.layout import group_rank, group_size, is_gated_fc1, shard_rows
from lora.megatron.wrapper import AdapterWrapper, add_to_base_output, apply_dropout

__all__ = [
    "LinearAdapter",
    "LoRALinear",
    "ParallelLinearAdapter",
    "ParallelLoRALinear",
    "wrap_linear",
    "wrap_parallel",
]


class LinearAdapter(nn.Module):
    """The adapter of an unsharded ``torch.nn.Linear``: scale * Dpost(B(A(Dpre(x)))) in its own dtype.

    ``linear_in`` is A (in -> r), ``linear_out`` is B (r -> out), neither with
    a bias; ``dim`` is r and ``alpha`` the scale numerator. The weights start
    uninitialised (no RNG draw): ``reset_parameters`` draws them.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        dim: int,
        *,
        alpha: float,
        dropout: float,
        dropout_position: str,
        lora_dtype: torch.dtype,
        device: Any = None,
    ) -> None:
        super().__init__()
        self.linear_in = nn.utils.skip_init(nn.Linear, in_features, dim, bias=False, dtype=lora_dtype, device=device)
        self.linear_out = nn.utils.skip_init(nn.Linear, dim, out_features, bias=False, dtype=lora_dtype, device=device)
        self.dim = dim
        self.alpha = alpha
        self.scale = alpha / dim
        self.dropout = dropout
        self.dropout_position = dropout_position
        self.lora_dtype = lora_dtype
        self.in_features = in_features
        self.out_features = out_features

    @torch.no_grad()
    def reset_parameters(self, a_method: str, b_method: str, generator: Optional[torch.Generator] = None) -> None:
        """Draw A then B over their (full) shapes."""
        a, b = init_adapter_weights(self.out_features, self.in_features, self.dim, a_method, b_method, generator=generator)
        self.linear_in.weight.copy_(a.to(self.linear_in.weight.dtype))
        self.linear_out.weight.copy_(b.to(self.linear_out.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(self.lora_dtype)
        if self.dropout_position == "pre":
            h = apply_dropout(h, self.dropout, self.training)
        h = self.linear_out(self.linear_in(h))
        if self.dropout_position == "post":
            h = apply_dropout(h, self.dropout, self.training)
        return h * self.scale

    def extra_repr(self) -> str:
        return f"dim={self.dim}, alpha={self.alpha}, dropout={self.dropout}, dropout_position={self.dropout_position!r}"


class LoRALinear(AdapterWrapper):
    """An unsharded ``torch.nn.Linear`` (``to_wrap``) plus its ``LinearAdapter`` (``adapter``)."""


def _adapter_config(base_config: Any, lora_dtype: torch.dtype) -> Any:
    """The base layer's config, adjusted for the adapter's own linears."""
    cfg = copy.copy(base_config)
    cfg.params_dtype = lora_dtype
    # We initialise from the full matrix ourselves (see module docstring).
    cfg.perform_initialization = False
    # The adapter handles sequence parallelism itself (gather before A, split after B).
    cfg.sequence_parallel = False
    # These fused paths need CUDA kernels or shared buffers meant for the base.
    for flag in ("gradient_accumulation_fusion", "tp_comm_overlap", "defer_embedding_wgrad_compute"):
        if hasattr(cfg, flag):
            setattr(cfg, flag, False)
    return cfg


def _noop_init(_: torch.Tensor) -> None:
    return None


class ParallelLinearAdapter(nn.Module):
    """A (``linear_in``) and B (``linear_out``) of one adapted parallel linear."""

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
        base_config: Any,
        tp_group: Any,
        is_expert: bool,
        gated: bool,
        module_name: str,
        input_is_parallel: bool = True,
        sequence_parallel: bool = False,
        a2a: bool = False,
        in_sp_block: bool = False,
        explicit_comm: bool = False,
    ) -> None:
        super().__init__()
        from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

        self.kind = kind
        self.dim = dim
        self.alpha = alpha
        self.scale = alpha / dim
        self.dropout = dropout
        self.dropout_position = dropout_position
        self.lora_dtype = lora_dtype
        self.gated = gated
        self.module_name = module_name
        self.in_features = in_features
        self.out_features = out_features
        # A row base either takes an input already split along `in`, or the
        # full input, which it scatters itself; A must take what the base takes.
        self.input_is_parallel = input_is_parallel if kind == "row" else False
        self.tp_size = group_size(tp_group)
        self.tp_rank = group_rank(tp_group)
        self.tp_group = tp_group
        # megatron turns sequence parallelism off for a TP group of one.
        self.sequence_parallel = bool(sequence_parallel) and self.tp_size > 1
        # The base's TP communication happens outside it (megatron's shared-expert overlap sets
        # ``explicit_expert_comm``): a column base gets the input already gathered and leaves its input
        # gradient partial; a row base returns partial sums that are reduced after it.
        self.explicit_comm = bool(explicit_comm) and self.tp_size > 1
        if a2a and kind != "row":
            raise ValueError(f"lora.megatron: {module_name}: a2a applies only to row-parallel bases (this one is {kind})")
        self.a2a = bool(a2a) and self.sequence_parallel and not self.explicit_comm
        # Inside a TransformerBlock that forks the model-parallel RNG stream around its layers (SP).
        self.in_sp_block = bool(in_sp_block) and self.sequence_parallel
        cfg = _adapter_config(base_config, lora_dtype)
        common = dict(config=cfg, init_method=_noop_init, bias=False, is_expert=is_expert, tp_group=tp_group)
        if kind == "column":
            # Under sequence parallelism the input is gathered from the
            # sequence region first; that gather's backward reduce-scatters,
            # so A must not all-reduce its input gradient as well.
            self.linear_in = ColumnParallelLinear(
                in_features, dim, gather_output=True, skip_bias_add=True,
                disable_grad_reduce=self.sequence_parallel or self.explicit_comm, **common,
            )
        else:
            self.linear_in = RowParallelLinear(
                in_features, dim, input_is_parallel=input_is_parallel, skip_bias_add=True, **common
            )
        # B's output stays split like the base's for a column base, and is
        # gathered to the base's full width for a row base (unless a2a does
        # the gather and the sequence split in one step).
        self.linear_out = ColumnParallelLinear(
            dim, out_features, gather_output=(kind == "row" and not self.a2a), skip_bias_add=True, **common
        )

    # -- initialisation ----------------------------------------------------
    def shard_A(self, full: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return full
        dim = 0 if self.kind == "column" else 1
        return torch.chunk(full, self.tp_size, dim=dim)[self.tp_rank]

    def shard_B(self, full: torch.Tensor) -> torch.Tensor:
        return shard_rows(full, self.tp_rank, self.tp_size, gated=self.gated and self.kind == "column")

    @torch.no_grad()
    def reset_parameters(self, a_method: str, b_method: str, generator: Optional[torch.Generator] = None) -> None:
        """Draw full A then B (``init_adapter_weights``, the SPEC's draw) and keep this rank's shards.

        Every rank must draw from identical generator states (``LoRA``
        synchronises torch's global generator from rank 0 before its walk).
        """
        full_a, full_b = init_adapter_weights(
            self.out_features, self.in_features, self.dim, a_method, b_method, generator=generator
        )
        self.linear_in.weight.copy_(self.shard_A(full_a).to(self.linear_in.weight.dtype))
        self.linear_out.weight.copy_(self.shard_B(full_b).to(self.linear_out.weight.dtype))

    # -- forward -----------------------------------------------------------
    def _dropout(self, x: torch.Tensor, sharded: bool) -> torch.Tensor:
        if self.dropout == 0.0 or not self.training:
            return x
        if not sharded and self.in_sp_block and self.explicit_comm:
            # The same values on every TP rank inside a block that runs under the model-parallel
            # stream (a different one per rank): draw from the stream every TP rank shares.
            from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, get_data_parallel_rng_tracker_name

            with get_cuda_rng_tracker().fork(get_data_parallel_rng_tracker_name()):
                return apply_dropout(x, self.dropout, True)
        if sharded and self.tp_size > 1:
            # Values that differ per TP rank draw from the model-parallel
            # stream, as megatron does for its own TP-region dropout.
            if self.in_sp_block:
                # Already on that stream: megatron's TransformerBlock forks it around the whole
                # block under sequence parallelism, and megatron's own TP-region dropout inside
                # it draws without a fork of its own. A nested fork would continue the stream in
                # forward but, under activation recompute (megatron's checkpoint restores the RNG
                # states, not the tracker's current stream), rewind torch's default stream on its
                # exit: every later draw of the recomputed layer (the expert adapters' dropout)
                # would get other masks than its forward had, and other gradients.
                return apply_dropout(x, self.dropout, True)
            from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

            with get_cuda_rng_tracker().fork():
                return apply_dropout(x, self.dropout, True)
        return apply_dropout(x, self.dropout, True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.lora_dtype)
        if self.dropout_position == "pre":
            # A column base sees the full (replicated) input, or its sequence
            # shard under sequence parallelism; a row base a shard, unless it
            # scatters the full input itself.
            x = self._dropout(x, sharded=self.input_is_parallel or (self.sequence_parallel and not self.explicit_comm))
        if self.sequence_parallel and self.kind == "column" and not self.explicit_comm:
            x = self._gather_sequence(x)
        h, _ = self.linear_in(x)
        out, _ = self.linear_out(h)
        if self.sequence_parallel and self.kind == "row" and not self.explicit_comm:
            out = self._to_sequence_shard(out)
        if self.dropout_position == "post":
            out = self._dropout(out, sharded=(self.kind == "column" or (self.sequence_parallel and not self.explicit_comm)))
        out = out * self.scale
        if self.explicit_comm and self.kind == "row":
            # The base returns this rank's partial sum, reduced over TP after it: add a TP-th of the
            # (full, replicated) delta on each rank, and pass the whole gradient back to it.
            out = _ShareOfReplicated.apply(out, self.tp_size)
        return out

    # -- checkpointing -------------------------------------------------------
    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Any = None) -> dict[str, Any]:
        """A and B as megatron-core's linears shard them over TP (each piece at its offset in the full,
        layout-independent tensor, replicas across data parallelism marked), B of a gated ``linear_fc1``
        through megatron's SwiGLU factory: each rank holds its gate slice then its up slice, which are two
        separate ranges of the full tensor. One entry per layer, keyed by the global layer number
        (``per_layer_entry``)."""
        from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
        from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

        metadata = ensure_metadata_has_dp_cp_group(metadata)
        entry, sharded_offsets = per_layer_entry(prefix, sharded_offsets)
        out = dict(self.linear_in.sharded_state_dict(f"{entry}linear_in.", sharded_offsets, metadata))
        b = dict(self.linear_out.sharded_state_dict(f"{entry}linear_out.", sharded_offsets, metadata))
        if self.gated and self.kind == "column":
            key = f"{entry}linear_out.weight"
            b[key] = apply_swiglu_sharded_factory(
                b[key], sharded_offsets, metadata.get("singleton_local_shards", False), tp_group=self.tp_group,
                dp_group=metadata["dp_cp_group"])
        out.update(b)
        # The entries' own keys carry the layer; the dict keeps the module's state-dict names (what
        # load_state_dict matches what a load returns by).
        return {prefix + k[len(entry):]: v for k, v in out.items()}

    # -- sequence parallelism ---------------------------------------------
    def _gather_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """(s/t, b, in) -> (s, b, in); backward: reduce-scatter of A's partial input gradients."""
        from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

        return gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=True, group=self.tp_group)

    def _to_sequence_shard(self, out: torch.Tensor) -> torch.Tensor:
        """A row base's adapter output into the base's layout, (s/t, b, out).

        Without a2a ``out`` is the full sum (s, b, out), the same on every
        rank: split it along the sequence (backward: all-gather). With a2a it
        is (s, b, out/t), split along the hidden dimension: one all-to-all
        gives (s/t, b, out).
        """
        from megatron.core.tensor_parallel import mappings

        if not self.a2a:
            return mappings.scatter_to_sequence_parallel_region(out, group=self.tp_group)
        s, *middle, _ = out.shape
        if s % self.tp_size:
            raise ValueError(
                f"lora.megatron: {self.module_name}: sequence length {s} is not divisible by TP={self.tp_size} (a2a)"
            )
        flat = mappings.all_to_all_hp2sp(out, group=self.tp_group)  # (s*b/t, out), tokens in (s, b) order
        return flat.reshape(s // self.tp_size, *middle, flat.shape[-1])


class _ShareOfReplicated(torch.autograd.Function):
    """Forward ``x / t``; backward the gradient unchanged: a replicated tensor entering a sum over t ranks
    whose backward hands every rank the whole gradient of the sum."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, t: int) -> torch.Tensor:
        return x / t

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        return grad, None


def per_layer_entry(prefix: str, sharded_offsets: tuple) -> tuple[str, tuple]:
    """An adapter's checkpoint entries inside a megatron TransformerBlock, one per layer.

    The block saves each parameter of its layers as one entry stacked along a leading layer axis (the
    layer's global number is the offset it passes down, and it rewrites ``decoder.layers.<i>.`` to
    ``decoder.layers.``). Every layer must then hold the parameter, which an adapter of only some layers
    (``*.layers.0.*.linear_qkv``) does not: megatron refuses such a checkpoint as incomplete. So an
    adapter folds the layer axis into its key instead: the key gets the global layer number after the
    block's prefix (``decoder.layers.<i>.<g>.x``, which the block's rewrite turns into
    ``decoder.layers.<g>.x``) and the layer offset is dropped. Outside a block, unchanged."""
    import re

    if len(sharded_offsets) != 1:
        return prefix, sharded_offsets
    found = list(re.finditer(r"(?:^|\.)layers\.\d+\.", prefix))
    if not found:
        return prefix, sharded_offsets
    end = found[-1].end()
    layer = int(sharded_offsets[0][1])
    return f"{prefix[:end]}{layer}.{prefix[end:]}", ()


class ParallelLoRALinear(AdapterWrapper):
    """A megatron parallel linear with a LoRA adapter added to its output."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        base_out = self.to_wrap(x, *args, **kwargs)
        if not self.adapter_on:
            return base_out
        delta = self.adapter(x)
        if self.adapter.kind == "column" and self.adapter.tp_size > 1 and self._base_gathers(kwargs):
            # A column base asked to gather its output (e.g. an output layer
            # with parallel_output=False) returns the full width; so must B.
            from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

            delta = gather_from_tensor_model_parallel_region(delta, group=self.to_wrap.tp_group)
        return add_to_base_output(base_out, delta)

    def _base_gathers(self, kwargs: dict[str, Any]) -> bool:
        runtime = kwargs.get("runtime_gather_output")
        return bool(self.to_wrap.gather_output if runtime is None else runtime)


# ------------------------------------------------------------- construction


def wrap_linear(cfg: Any, module: nn.Linear, full_name: str) -> LoRALinear:
    """An unsharded nn.Linear: a plain single-device adapter (``cfg`` is the LoRA config)."""
    weight = module.weight
    lora_dtype = cfg.lora_dtype or (weight.dtype if weight.is_floating_point() else torch.float32)
    adapter = LinearAdapter(
        module.in_features,
        module.out_features,
        cfg.adapter_rank(module, full_name),
        alpha=cfg.alpha,
        dropout=cfg.dropout,
        dropout_position=cfg.dropout_position,
        lora_dtype=lora_dtype,
        device=weight.device,
    )
    adapter.reset_parameters(cfg.lora_A_init_method, cfg.lora_B_init_method)
    return LoRALinear(module, adapter)


def wrap_parallel(cfg: Any, module: nn.Module, full_name: str, kind: str, in_sp_block: bool = False) -> ParallelLoRALinear:
    """A megatron-core column (``kind`` 'column') or row parallel linear on its TP group (``cfg`` is the LoRA config;
    ``in_sp_block``: the linear lives in a TransformerBlock that forks the model-parallel RNG stream, SP)."""
    config = module.config
    tp_group = module.tp_group
    t = group_size(tp_group)
    dim = cfg.adapter_rank(module, full_name)
    sequence_parallel = t > 1 and bool(getattr(module, "sequence_parallel", False))
    if kind == "column" and dim % t:
        raise ValueError(
            f"lora.megatron: dim={dim} is not divisible by TP={t} for {full_name} "
            "(a column-parallel base splits A along the rank dimension)"
        )
    if kind == "row" and module.output_size % t:
        raise ValueError(
            f"lora.megatron: output size {module.output_size} is not divisible by TP={t} for {full_name} "
            "(a row-parallel base splits B along its output rows)"
        )
    lora_dtype = cfg.lora_dtype or module.weight.dtype
    adapter = ParallelLinearAdapter(
        kind=kind,
        in_features=module.input_size,
        out_features=module.output_size,
        dim=dim,
        alpha=cfg.alpha,
        dropout=cfg.dropout,
        dropout_position=cfg.dropout_position,
        lora_dtype=lora_dtype,
        base_config=config,
        tp_group=tp_group,
        is_expert=bool(getattr(module, "is_expert", False)),
        gated=is_gated_fc1(module, full_name),
        module_name=full_name,
        input_is_parallel=bool(getattr(module, "input_is_parallel", True)),
        sequence_parallel=sequence_parallel,
        in_sp_block=in_sp_block,
        explicit_comm=bool(getattr(module, "explicit_expert_comm", False)),
        # a2a replaces a row adapter's gather + sequence split; a column
        # adapter has no such step, so the flag does not concern it.
        a2a=bool(cfg.a2a_experimental) and kind == "row",
    )
    adapter.reset_parameters(cfg.lora_A_init_method, cfg.lora_B_init_method)
    return ParallelLoRALinear(module, adapter)
