"""Tiny real megatron-core mixture-of-experts GPTs, built for the active layout, on CPU.

``MoEShape`` is a ``GPTShape`` plus what fixes an MoE model's full weights
and its routing (expert count, top-k, expert and shared-expert widths) and
how the experts are computed (token ``dispatcher``, ``grouped`` experts).
``build_moe_gpt`` builds megatron-core's own ``GPTModel`` with an
``MoELayer`` in every layer for whatever ``parallel_state`` currently says.

Routing is made deterministic and layout-independent: load balancing "none"
with aux-loss and z-loss off, no input jitter, no capacity factor (dropless,
no token dropping or padding), no expert bias, plain softmax top-k. The
router then depends only on each token's hidden state, so every layout sends
every token to the same experts with the same probabilities.

Experts:

* ``grouped=False``: megatron's ``SequentialMLP`` (one ``MLP`` per local
  expert, megatron's local spec);
* ``grouped=True``: megatron's ``TEGroupedMLP`` (what megatron 0.19.2 builds
  for grouped experts) with its ``linear_fc1`` / ``linear_fc2`` supplied by
  ``TorchGroupedLinear`` (column / row flavour) instead of Transformer
  Engine, which does not import without a GPU. Parameter names follow TE's
  ``GroupedLinear`` (``weight0``, ``weight1``, ... one per local expert).

Layouts: TP > 1 needs sequence parallelism (megatron's MoELayer refuses to
train otherwise), and with it every norm is ``SequenceParallelNorm``.
Expert-parallel (EP) ranks hold ``num_experts / ep`` experts each (global
index ``ep_rank * local + i``), and each expert's linears are split over
the expert-tensor-parallel (ETP) group. ``harness.sharding.load_full_base_weights``
with its expert arguments (``expert_sizes`` here gives them) loads the same
full weights at every layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Optional

import torch
from torch import nn

from harness.families.gpt.model import GPTShape, SequenceParallelNorm, ShapeError, gpt_model_from_layer_spec, transformer_config

__all__ = [
    "MoEShape",
    "DISPATCHERS",
    "build_moe_gpt",
    "build_moe_stage",
    "moe_config",
    "moe_layer_spec",
    "layout_sizes",
    "expert_sizes",
    "TorchGroupedLinear",
    "TorchColumnParallelGroupedLinear",
    "TorchRowParallelGroupedLinear",
    "RoutingCounter",
]

DISPATCHERS = ("allgather", "alltoall")


@dataclass(frozen=True)
class MoEShape(GPTShape):
    """A GPTShape whose MLPs are mixtures of experts.

    ``ffn_hidden_size`` is unused by the MoE layers (megatron still wants it
    set); each routed expert is ``moe_ffn_hidden_size`` wide and the optional
    shared expert ``shared_expert_ffn_hidden_size`` wide.
    """

    num_experts: int = 4
    moe_router_topk: int = 2
    moe_ffn_hidden_size: int = 16
    shared_expert_ffn_hidden_size: Optional[int] = None
    dispatcher: str = "alltoall"
    grouped: bool = False
    #: megatron's ``moe_shared_expert_overlap``: the shared expert's TP communication runs outside its
    #: linears (``explicit_expert_comm``), overlapped with the token dispatcher (alltoall only).
    shared_expert_overlap: bool = False

    def check(self, tp: int, ep: int = 1, etp: Optional[int] = None) -> None:  # type: ignore[override]
        """Raise ShapeError naming the field, value and rule if the layout cannot shard this shape."""
        super().check(tp)
        etp = tp if etp is None else etp
        rules = [
            ("dispatcher", self.dispatcher in DISPATCHERS, f"one of {DISPATCHERS}"),
            ("num_experts", self.num_experts >= 1, "at least 1"),
            ("num_experts", self.num_experts % ep == 0, f"divisible by EP={ep}"),
            ("moe_router_topk", 1 <= self.moe_router_topk <= self.num_experts, f"in 1..num_experts={self.num_experts}"),
            ("moe_ffn_hidden_size", self.moe_ffn_hidden_size % etp == 0, f"divisible by ETP={etp}"),
        ]
        if self.shared_expert_ffn_hidden_size is not None:
            rules.append(
                ("shared_expert_ffn_hidden_size", self.shared_expert_ffn_hidden_size % tp == 0, f"divisible by TP={tp}")
            )
        if self.shared_expert_overlap:
            rules.append(("shared_expert_overlap", self.shared_expert_ffn_hidden_size is not None,
                          "True only with a shared expert (shared_expert_ffn_hidden_size set)"))
            rules.append(("shared_expert_overlap", self.dispatcher == "alltoall",
                          "True only with the alltoall dispatcher (megatron-core's rule)"))
        if self.add_bias_linear:
            rules.append(("add_bias_linear", etp == 1, f"False at ETP={etp} (megatron-core: bias in MoE only with ETP == 1)"))
        if self.add_bias_linear and self.shared_expert_ffn_hidden_size is not None:
            rules.append(("add_bias_linear", False, "False with shared experts (megatron's SharedExpertMLP has no bias)"))
        self._require(rules, "MoEShape", show=repr)


def layout_sizes(layout: Any) -> dict[str, Any]:
    """``build_moe_gpt`` keyword arguments for a ``harness.layouts.ParallelLayout``."""
    return {"tp": layout.tp, "ep": layout.ep, "etp": layout.etp_size, "sequence_parallel": layout.sp}


def expert_sizes() -> dict[str, int]:
    """This rank's TP / EP / ETP ranks and sizes from megatron's parallel_state, as keyword
    arguments of ``harness.sharding.load_full_base_weights``."""
    from megatron.core import parallel_state as ps

    return {
        "tp_rank": ps.get_tensor_model_parallel_rank(),
        "tp_size": ps.get_tensor_model_parallel_world_size(),
        "ep_rank": ps.get_expert_model_parallel_rank(),
        "ep_size": ps.get_expert_model_parallel_world_size(),
        "etp_rank": ps.get_expert_tensor_parallel_rank(),
        "etp_size": ps.get_expert_tensor_parallel_world_size(),
    }


# --------------------------------------------------------- grouped linears


class TorchGroupedLinear(nn.Module):
    """A torch-native stand-in for TE's ``GroupedLinear`` as megatron's experts use it.

    Fulfils ``GroupedLinearFc1Builder`` / ``GroupedLinearFc2Builder`` of
    ``megatron.core.transformer.moe.experts`` (what ``TEGroupedMLP`` builds
    its ``linear_fc1`` / ``linear_fc2`` with). One weight per local expert,
    ``weight{i}`` of shape (out, in) like TE's; ``forward(x, tokens_per_expert)``
    splits the rows of ``x`` by ``tokens_per_expert`` (a list of ints, as
    TEGroupedMLP passes it) and applies expert i's linear to its block.

    Tensor parallelism over the expert-TP group is what TE does when megatron
    handles the communication itself (``explicit_expert_comm``): the token
    dispatcher gathers and scatters over ETP, so this module never
    communicates. The "column" flavour holds ``output_size / etp`` rows of
    each expert's weight (and bias), the "row" flavour ``input_size / etp``
    columns (its bias replicated). Parameters carry megatron's attributes
    (``tensor_model_parallel``, ``partition_dim``, ``partition_stride`` and
    ``allreduce = False`` when expert process groups apply), exactly as
    megatron sets them on TE's grouped linears.

    Initial values come from ``init_method`` applied to each local shard
    (not sliced from a full master weight as megatron's CPU initialisation
    does), so they differ between layouts; the harness overwrites them with
    ``harness.sharding.load_full_base_weights`` anyway.

    Returns ``(output, None)``, or with ``skip_bias_add`` and a bias
    ``(output, [bias_i per expert])`` as TE does (TEGroupedMLP applies them
    per expert, scaled by the routing probabilities).
    """

    def __init__(
        self,
        num_local_experts: int,
        input_size: int,
        output_size: int,
        /,
        *,
        parallel_mode: str,
        config: Any,
        init_method: Callable[[torch.Tensor], Any],
        bias: bool,
        skip_bias_add: bool,
        is_expert: bool,
        tp_comm_buffer_name: Optional[str] = None,
        pg_collection: Any = None,
        name: Optional[str] = None,
    ) -> None:
        super().__init__()
        if parallel_mode not in ("column", "row"):
            raise ValueError(f"TorchGroupedLinear: parallel_mode={parallel_mode!r}; expected 'column' or 'row'")
        if not is_expert:
            raise ValueError("TorchGroupedLinear only serves experts (is_expert=True), like TE's grouped linear")
        if pg_collection is None:
            from megatron.core.process_groups_config import ProcessGroupCollection

            pg_collection = ProcessGroupCollection.use_mpu_process_groups()
        self.config = config
        self.parallel_mode = parallel_mode
        self.num_gemms = num_local_experts
        self.tp_group = pg_collection.expt_tp
        tp_size = self.tp_group.size() if self.tp_group is not None else 1
        if parallel_mode == "column":
            if output_size % tp_size:
                raise ValueError(f"TorchGroupedLinear: output_size={output_size} not divisible by ETP={tp_size}")
            output_size //= tp_size
        else:
            if input_size % tp_size:
                raise ValueError(f"TorchGroupedLinear: input_size={input_size} not divisible by ETP={tp_size}")
            input_size //= tp_size
        self.in_features = input_size
        self.out_features = output_size
        self.skip_bias_add = skip_bias_add
        self.use_bias = bias
        use_expert_pgs = config.expert_model_parallel_size > 1 or (
            config.expert_tensor_parallel_size != config.tensor_model_parallel_size
        )
        dtype = config.params_dtype
        for i in range(num_local_experts):
            w = nn.Parameter(torch.empty(output_size, input_size, dtype=dtype))
            if config.perform_initialization:
                init_method(w)
            w.tensor_model_parallel = True
            w.partition_dim = 0 if parallel_mode == "column" else 1
            w.partition_stride = 1
            w.allreduce = not use_expert_pgs
            self.register_parameter(f"weight{i}", w)
            if bias:
                b = nn.Parameter(torch.zeros(output_size, dtype=dtype))
                b.tensor_model_parallel = parallel_mode == "column"
                if parallel_mode == "column":
                    b.partition_dim = 0
                    b.partition_stride = 1
                b.allreduce = not use_expert_pgs
                self.register_parameter(f"bias{i}", b)

    def weights(self) -> list[torch.Tensor]:
        return [getattr(self, f"weight{i}") for i in range(self.num_gemms)]

    def biases(self) -> list[torch.Tensor]:
        return [getattr(self, f"bias{i}") for i in range(self.num_gemms)] if self.use_bias else []

    def forward(self, x: torch.Tensor, tokens_per_expert: Any) -> tuple[torch.Tensor, Optional[list[torch.Tensor]]]:
        splits = [int(n) for n in (tokens_per_expert.tolist() if torch.is_tensor(tokens_per_expert) else tokens_per_expert)]
        if len(splits) != self.num_gemms:
            raise ValueError(f"TorchGroupedLinear: {len(splits)} token counts for {self.num_gemms} local experts")
        if sum(splits) != x.shape[0]:
            raise ValueError(f"TorchGroupedLinear: token counts sum to {sum(splits)}, input has {x.shape[0]} rows")
        add_bias = self.use_bias and not self.skip_bias_add
        outs = []
        for i, block in enumerate(torch.split(x, splits)):
            w = getattr(self, f"weight{i}")
            b = getattr(self, f"bias{i}") if add_bias else None
            outs.append(nn.functional.linear(block, w, b))
        out = torch.cat(outs, dim=0) if outs else x.new_zeros(0, self.out_features)
        if self.use_bias and self.skip_bias_add:
            return out, self.biases()
        return out, None

    def backward_dw(self) -> None:
        """Weight gradients are computed in the ordinary backward (no delayed wgrad)."""
        return None

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Any = None) -> dict[str, Any]:
        """megatron's distributed-checkpoint view, as megatron-core's TEGroupedLinear gives TE's: local expert i's
        weight (and bias) is the piece of ``<prefix>weight`` (``bias``) at its global expert index, split over
        the expert-TP group (column: rows of weight and bias; row: the weight's columns, the bias whole) and
        replicated over expert data parallelism. TEGroupedMLP builds on that layout (its SwiGLU factory for a
        gated fc1 adds the expert axis to ``weight<i>`` and ``bias<i>``); without it megatron's default took
        every tensor for replicated, and a gated fc1's 1-D bias broke that factory."""
        from megatron.core import parallel_state as ps
        from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
        from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, make_sharded_tensors_for_checkpoint

        metadata = ensure_metadata_has_dp_cp_group(metadata)
        ep, ep_rank = ps.get_expert_model_parallel_world_size(), ps.get_expert_model_parallel_rank()
        edp_rank = ps.get_expert_data_parallel_rank()
        n = self.num_gemms
        out: dict[str, Any] = {}
        for i in range(n):
            state = {f"{i}.weight": self._parameters[f"weight{i}"]}
            if self.use_bias:
                state[f"{i}.bias"] = self._parameters[f"bias{i}"]
            axes = {f"{i}.weight": 0, f"{i}.bias": 0} if self.parallel_mode == "column" else {f"{i}.weight": 1}
            offsets = (*sharded_offsets, (len(sharded_offsets), ep_rank * n + i, ep * n))
            sub = make_sharded_tensors_for_checkpoint(state, "", axes, offsets, tp_group=self.tp_group,
                                                      dp_cp_group=metadata["dp_cp_group"])
            replace_prefix_for_sharding(sub, f"{i}.", prefix)
            out[f"{prefix}weight{i}"] = sub[f"{i}.weight"]
            if self.use_bias:
                out[f"{prefix}bias{i}"] = sub[f"{i}.bias"]
        for sh in out.values():
            sh.replica_id = (*sh.replica_id[:2], edp_rank)
        return out

    def extra_repr(self) -> str:
        return f"{self.parallel_mode}, experts={self.num_gemms}, in={self.in_features}, out={self.out_features}, bias={self.use_bias}"


class TorchColumnParallelGroupedLinear(TorchGroupedLinear):
    """``GroupedLinearFc1Builder``: each expert's output rows split over ETP."""

    def __init__(self, num_local_experts: int, input_size: int, output_size: int, /, **kwargs: Any) -> None:
        super().__init__(num_local_experts, input_size, output_size, parallel_mode="column", **kwargs)


class TorchRowParallelGroupedLinear(TorchGroupedLinear):
    """``GroupedLinearFc2Builder``: each expert's input columns split over ETP."""

    def __init__(self, num_local_experts: int, input_size: int, output_size: int, /, **kwargs: Any) -> None:
        super().__init__(num_local_experts, input_size, output_size, parallel_mode="row", **kwargs)


# ------------------------------------------------------------------ config


def moe_config(
    shape: MoEShape,
    *,
    tp: int = 1,
    ep: int = 1,
    etp: Optional[int] = None,
    sequence_parallel: bool = False,
    params_dtype: torch.dtype = torch.float32,
    **overrides: Any,
) -> Any:
    """The TransformerConfig of ``build_moe_gpt``: the dense one plus deterministic dropless routing."""
    moe: dict[str, Any] = dict(
        num_moe_experts=shape.num_experts,
        moe_router_topk=shape.moe_router_topk,
        moe_ffn_hidden_size=shape.moe_ffn_hidden_size,
        moe_shared_expert_intermediate_size=shape.shared_expert_ffn_hidden_size,
        moe_token_dispatcher_type=shape.dispatcher,
        moe_grouped_gemm=shape.grouped,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=tp if etp is None else etp,
        # Deterministic, layout-independent routing: no load balancing losses
        # (their gradients depend on how tokens are split over ranks), no
        # jitter, no capacity (dropless), no expert bias, no fused kernels.
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_z_loss_coeff=None,
        moe_input_jitter_eps=None,
        moe_expert_capacity_factor=None,
        moe_pad_expert_input_to_capacity=False,
        moe_router_enable_expert_bias=False,
        moe_router_score_function="softmax",
        # megatron refuses top-1 routing without softmax before the top-k.
        moe_router_pre_softmax=shape.moe_router_topk == 1,
        moe_permute_fusion=False,
        moe_router_fusion=False,
        moe_shared_expert_overlap=shape.shared_expert_overlap,
        moe_shared_expert_gate=False,
    )
    moe.update(overrides)
    return transformer_config(shape, tp=tp, sequence_parallel=sequence_parallel, params_dtype=params_dtype, **moe)


def moe_layer_spec(shape: MoEShape, *, sequence_parallel: bool, normalization: str = "RMSNorm") -> Any:
    """One MoE transformer layer's spec: megatron's local spec, grouped experts on torch, SP norms."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.moe.experts import GroupedMLPSubmodules, TEGroupedMLP

    spec = get_gpt_layer_local_spec(
        num_experts=shape.num_experts, moe_grouped_gemm=shape.grouped, normalization=normalization
    )
    sub = spec.submodules
    if shape.grouped:
        # The local backend always builds SequentialMLP; swap in the grouped
        # experts megatron builds with TE, on torch grouped linears.
        mlp = sub.mlp
        moe_sub = mlp.keywords["submodules"]
        moe_sub.experts = partial(
            TEGroupedMLP,
            submodules=GroupedMLPSubmodules(
                linear_fc1=TorchColumnParallelGroupedLinear, linear_fc2=TorchRowParallelGroupedLinear
            ),
        )
    if sequence_parallel:
        for field in ("input_layernorm", "pre_mlp_layernorm"):
            current = getattr(sub, field)
            if current is not None and getattr(current, "__name__", "") != "IdentityOp":
                setattr(sub, field, SequenceParallelNorm)
    return spec


def _check_parallel_state(tp: int, ep: int, etp: int) -> None:
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        raise RuntimeError("build_moe_gpt: megatron's parallel_state is not initialised (ParallelLayout.initialize_megatron)")
    actual = (
        ps.get_tensor_model_parallel_world_size(),
        ps.get_expert_model_parallel_world_size(),
        ps.get_expert_tensor_parallel_world_size(),
    )
    if actual != (tp, ep, etp):
        raise ValueError(
            f"build_moe_gpt(tp={tp}, ep={ep}, etp={etp}) but parallel_state holds tp={actual[0]}, "
            f"ep={actual[1]}, etp={actual[2]}"
        )


def build_moe_gpt(
    shape: MoEShape,
    *,
    tp: int = 1,
    ep: int = 1,
    etp: Optional[int] = None,
    sequence_parallel: bool = False,
    params_dtype: torch.dtype = torch.float32,
    parallel_output: bool = False,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: Optional[int] = None,
    **config_overrides: Any,
) -> Any:
    """megatron-core GPTModel with an MoELayer in every layer, for the active parallel_state; under
    pipeline parallelism one chunk of this rank's stage (``pre_process``, ``post_process`` and
    ``vp_stage`` as ``harness.families.gpt.model.build_gpt``'s).

    ``tp``, ``ep``, ``etp`` (None: same as tp) and ``sequence_parallel`` must
    match the layout parallel_state holds (``layout_sizes(layout)`` gives
    them for a ParallelLayout). TP > 1 requires ``sequence_parallel=True``.
    Conventions as ``harness.families.gpt.model.build_gpt``: under SP a
    ``decoder_input`` must be this rank's sequence shard; logits come back
    full, (b, s, vocab), on every rank (``parallel_output`` as there). Norms use torch's default dtype
    (cast the model with ``.to(dtype)`` for float64 runs).
    """
    etp = tp if etp is None else etp
    shape.check(tp, ep, etp)
    if tp > 1 and not sequence_parallel:
        raise ShapeError(
            f"build_moe_gpt: TP={tp} without sequence parallelism; megatron's MoELayer refuses to "
            "train MoE with TP > 1 unless sequence_parallel=True"
        )
    _check_parallel_state(tp, ep, etp)
    config = moe_config(
        shape, tp=tp, ep=ep, etp=etp, sequence_parallel=sequence_parallel, params_dtype=params_dtype, **config_overrides
    )
    one_layer = moe_layer_spec(shape, sequence_parallel=sequence_parallel, normalization=config.normalization)
    return gpt_model_from_layer_spec(shape, config, one_layer, sequence_parallel=sequence_parallel, parallel_output=parallel_output,
                                     pre_process=pre_process, post_process=post_process, vp_stage=vp_stage)


def build_moe_stage(case: Any, parallel_output: bool, **overrides: Any) -> list[Any]:
    """The case's MoE model as this rank holds it: ``[GPTModel]``, or under pipeline parallelism the stage's
    chunks (``harness.pipeline.stage_chunks``), in the case's dtype, each with ``overrides`` in its config."""
    from harness.pipeline import pipeline_config, stage_chunks

    config = {**pipeline_config(case.layout, case.model_dtype), **overrides}
    return stage_chunks(
        lambda pre, post, vp: build_moe_gpt(case.shape, **layout_sizes(case.layout), params_dtype=case.model_dtype,
                                            parallel_output=parallel_output, pre_process=pre, post_process=post,
                                            vp_stage=vp, **config).to(case.model_dtype),
        case.layout)


# ----------------------------------------------------------------- routing


class RoutingCounter:
    """Counts, per MoE layer, how many tokens the routers sent to each (global) expert.

    Hooks every ``TopKRouter`` of ``model``; ``counts[layer_name]`` is an
    int64 tensor (num_experts,) summed over the forwards since ``attach``
    (this rank's tokens only: sum over ranks that hold different tokens).
    """

    def __init__(self, model: nn.Module) -> None:
        from megatron.core.transformer.moe.router import Router

        self.counts: dict[str, torch.Tensor] = {}
        self._handles = []
        for name, module in model.named_modules():
            if isinstance(module, Router):
                self._handles.append(module.register_forward_hook(partial(self._hook, name)))
        if not self._handles:
            raise ValueError("RoutingCounter: the model has no megatron Router")

    def _hook(self, name: str, module: nn.Module, inputs: Any, output: Any) -> None:
        _probs, routing_map = output
        n = routing_map.reshape(-1, routing_map.shape[-1]).sum(dim=0).to(torch.int64).detach().cpu()
        self.counts[name] = self.counts.get(name, torch.zeros_like(n)) + n

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
