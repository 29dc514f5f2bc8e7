"""Tiny real megatron-core models for the checks, built for the active layout.

``GPTShape`` is everything that fixes a model's full (unsharded) weights;
``build_gpt`` builds megatron-core's own ``GPTModel`` (local layer spec,
RMSNorm, RoPE, grouped-query attention, optional gated MLP) for whatever
``parallel_state`` currently says, so the same shape can be built at every
layout and loaded with the same full weights (see ``harness.sharding``).

Sequence parallelism: ``build_gpt(..., sequence_parallel=True)`` swaps
megatron's torch-only norm (``WrappedTorchNorm``, which refuses sequence
parallelism) for ``SequenceParallelNorm`` in every layer and in the final
norm. Nothing else changes; with ``sequence_parallel=False`` the model is
built exactly as before.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

import torch
from harness.errors import ShapeError
from harness.sharding import seeded_tensor

__all__ = [
    "GPTShape",
    "ShapeError",
    "transformer_config",
    "gpt_model_from_layer_spec",
    "build_gpt",
    "build_stage",
    "output_layer_gathers",
    "causal_mask",
    "SequenceParallelNorm",
    "sequence_parallel_layer_spec",
    "sequence_parallel_params",
]


@dataclass(frozen=True)
class GPTShape:
    num_layers: int = 2
    hidden_size: int = 32
    num_attention_heads: int = 4
    num_query_groups: int = 2
    ffn_hidden_size: int = 64
    vocab_size: int = 64
    seq_length: int = 8
    micro_batch_size: int = 2
    gated_linear_unit: bool = True
    add_bias_linear: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def check(self, tp: int) -> None:
        """Raise ShapeError naming the field, value and rule if TP=tp cannot shard this shape."""
        rules = [
            ("hidden_size", self.hidden_size % self.num_attention_heads == 0, f"a multiple of num_attention_heads={self.num_attention_heads}"),
            ("num_attention_heads", self.num_attention_heads % self.num_query_groups == 0, f"a multiple of num_query_groups={self.num_query_groups}"),
            ("num_attention_heads", self.num_attention_heads % tp == 0, f"divisible by TP={tp}"),
            ("num_query_groups", self.num_query_groups % tp == 0, f"divisible by TP={tp}"),
            ("ffn_hidden_size", self.ffn_hidden_size % tp == 0, f"divisible by TP={tp}"),
            ("vocab_size", self.vocab_size % tp == 0, f"divisible by TP={tp}"),
            ("hidden_size", self.hidden_size % tp == 0, f"divisible by TP={tp}"),
        ]
        self._require(rules, "GPTShape")

    def _require(self, rules: list[tuple[str, bool, str]], owner: str, show: Any = str) -> None:
        """Raise ``ShapeError`` for the first ``(field, holds, rule)`` that does not hold."""
        for field, ok, rule in rules:
            if not ok:
                raise ShapeError(f"{owner}.{field}={show(getattr(self, field))} must be {rule}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def transformer_config(
    shape: GPTShape, *, tp: int = 1, sequence_parallel: bool = False, params_dtype: torch.dtype = torch.float32, **overrides: Any
) -> Any:
    from megatron.core.transformer.transformer_config import TransformerConfig

    kwargs: dict[str, Any] = dict(
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        num_attention_heads=shape.num_attention_heads,
        num_query_groups=shape.num_query_groups,
        ffn_hidden_size=shape.ffn_hidden_size,
        gated_linear_unit=shape.gated_linear_unit,
        add_bias_linear=shape.add_bias_linear,
        normalization="RMSNorm",
        tensor_model_parallel_size=tp,
        sequence_parallel=sequence_parallel,
        params_dtype=params_dtype,
        use_cpu_initialization=not torch.cuda.is_available(),
        # Dropout in the base model would make layouts incomparable.
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # Fused kernels need CUDA; the unfused paths compute the same math.
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


class SequenceParallelNorm:
    """megatron's torch norm (RMSNorm or LayerNorm, per ``config.normalization``), usable under sequence parallelism.

    A drop-in for ``megatron.core.transformer.torch_norm.WrappedTorchNorm``
    (same builder signature, same module type ``torch.nn.RMSNorm`` /
    ``torch.nn.LayerNorm``, same parameter names ``weight`` / ``bias``, same
    dtype: torch's default, as WrappedTorchNorm ignores ``params_dtype``),
    minus its refusal of ``config.sequence_parallel``. A norm acts on each token on
    its own, so on a sequence shard (s/t, b, h) it needs no communication in
    forward or backward: each TP rank normalises its own tokens with the full,
    replicated weight.

    What the caller must know: under sequence parallelism each TP rank's
    norm-weight (and bias) gradient covers only that rank's tokens, so the
    ranks hold *different partial* gradients, and the full gradient is their
    **sum over the TP group**. The parameters carry ``sequence_parallel =
    True`` exactly like megatron's fused norms, which is what megatron's
    grad-sync (``finalize_model_grads``) keys on to all-reduce them over TP.
    A harness that compares per-rank gradients with a single-device run must
    therefore sum every parameter with ``sequence_parallel`` set over the TP
    ranks first (``sequence_parallel_params`` lists them), not take rank 0's
    or compare each rank's.
    """

    def __new__(
        cls,
        config: Any,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: Optional[str] = None,
    ) -> torch.nn.Module:
        if getattr(config, "layernorm_zero_centered_gamma", False):
            raise ValueError("SequenceParallelNorm: layernorm_zero_centered_gamma is not supported by torch norms")
        if getattr(config, "memory_efficient_layer_norm", False):
            raise ValueError("SequenceParallelNorm: memory_efficient_layer_norm is not supported by torch norms")
        kind = config.normalization
        # Like WrappedTorchNorm, torch's default dtype (params_dtype is not
        # applied), so that a model differs from its non-SP build only in SP.
        if kind == "RMSNorm":
            norm: torch.nn.Module = torch.nn.RMSNorm(hidden_size, eps=eps)
        elif kind == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps)
        else:
            raise ValueError(f"SequenceParallelNorm: normalization={kind!r}; supported: 'RMSNorm', 'LayerNorm'")
        sp = bool(config.sequence_parallel)
        for p in norm.parameters():
            # What megatron's own norms set, and what its grad-sync reads.
            setattr(p, "sequence_parallel", sp)
        return norm


def sequence_parallel_params(model: torch.nn.Module) -> list[str]:
    """Names of the parameters whose per-rank gradients must be summed over TP (``sequence_parallel`` set)."""
    return [n for n, p in model.named_parameters() if getattr(p, "sequence_parallel", False)]


def sequence_parallel_layer_spec(normalization: str = "RMSNorm") -> Any:
    """The local GPT block spec with ``SequenceParallelNorm`` for every norm (layers' and final).

    A ``TransformerBlockSubmodules`` (GPTModel accepts it as its layer
    spec): megatron's own local layer spec with ``input_layernorm`` and
    ``pre_mlp_layernorm`` replaced, and the block's final norm set, since
    from a layer spec the block would pick ``WrappedTorchNorm`` itself.
    """
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    spec = get_gpt_layer_local_spec(normalization=normalization)
    sub = spec.submodules
    for field in ("input_layernorm", "pre_mlp_layernorm"):
        current = getattr(sub, field)
        if current is not None and getattr(current, "__name__", "") != "IdentityOp":
            setattr(sub, field, SequenceParallelNorm)
    return spec


def build_gpt(
    shape: GPTShape, *, tp: int, sequence_parallel: bool = False, params_dtype: torch.dtype = torch.float32,
    parallel_output: bool = False, pre_process: bool = True, post_process: bool = True, vp_stage: Optional[int] = None,
    **config_overrides: Any
) -> Any:
    """megatron-core GPTModel for the active parallel_state (logits gathered over TP).

    Under pipeline parallelism (``config_overrides`` from ``harness.pipeline.pipeline_config``) it
    is one chunk of this rank's stage: ``pre_process`` holds the embedding, ``post_process`` the
    final norm and output layer, ``vp_stage`` names the virtual stage.

    ``parallel_output=True`` builds it as training does (the output layer
    returns this rank's vocabulary shard) and gathers the logits after the
    model, outside anything an implementation adapts (``gather_logits``);
    ``False`` has megatron's output layer gather them, so a column-parallel
    base there returns the full width (a configuration only the strict
    contract promises to handle: ``output_layer_gathers``).

    With ``sequence_parallel=True`` every norm is a ``SequenceParallelNorm``
    (see there: the parent must sum the norm weights' gradients over TP
    before comparing them). megatron's own layout conventions then apply:
    a ``decoder_input`` passed to the model must already be this rank's
    sequence shard, (s/t, b, h) (megatron only scatters what its embedding
    computes), and its gradient is that shard's; the output layer gathers
    the hidden states from the sequence region and, with
    ``parallel_output=False``, the logits over TP, so every rank returns the
    full (b, s, vocab) logits.
    """
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    shape.check(tp)
    config = transformer_config(
        shape, tp=tp, sequence_parallel=sequence_parallel, params_dtype=params_dtype, **config_overrides
    )
    if sequence_parallel:
        one_layer = sequence_parallel_layer_spec(config.normalization)
    else:
        one_layer = get_gpt_layer_local_spec(normalization="RMSNorm")
    return gpt_model_from_layer_spec(shape, config, one_layer, sequence_parallel=sequence_parallel, parallel_output=parallel_output,
                                     pre_process=pre_process, post_process=post_process, vp_stage=vp_stage)


def build_stage(case: Any, tp: int, **overrides: Any) -> list[Any]:
    """The case's model as this rank holds it at the case's layout: ``[GPTModel]``, or under pipeline
    parallelism the stage's chunks (``harness.pipeline.stage_chunks``), each with ``overrides`` in its config."""
    from harness.pipeline import pipeline_config, stage_chunks

    layout = case.layout
    config = {**pipeline_config(layout, case.model_dtype), **overrides}
    return stage_chunks(
        lambda pre, post, vp: build_gpt(case.shape, tp=tp, sequence_parallel=layout.sp, params_dtype=case.model_dtype,
                                        parallel_output=not output_layer_gathers(case.contract), pre_process=pre,
                                        post_process=post, vp_stage=vp, **config),
        layout)


def output_layer_gathers(contract: str) -> bool:
    """Whether the harness builds models whose output layer gathers its logits (``parallel_output=False``).

    The strict contract promises that a column-parallel base that gathers
    its output gets a gathered adapter output too; Megatron-Bridge does
    not (real training keeps ``parallel_output=True``), so under the
    ``bridge`` contract the logits are gathered after the model instead.
    """
    return contract != "bridge"


def _gather_logits_hook(module: Any, args: Any, output: Any) -> Any:
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    return gather_from_tensor_model_parallel_region(output)


def gpt_model_from_layer_spec(
    shape: GPTShape, config: Any, one_layer: Any, *, sequence_parallel: bool, parallel_output: bool = False,
    pre_process: bool = True, post_process: bool = True, vp_stage: Optional[int] = None,
) -> Any:
    """megatron's GPTModel with ``one_layer`` in every layer (logits gathered over TP).

    Under sequence parallelism the block's final norm is a
    ``SequenceParallelNorm`` too; otherwise megatron's spec is used as it is.
    Shared by the dense and the MoE builders.
    """
    from megatron.core.models.gpt import GPTModel

    from harness import cpu

    layer_spec: Any = one_layer
    if sequence_parallel:
        from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

        # What megatron builds from a layer spec, with the final norm ours.
        layer_spec = TransformerBlockSubmodules(
            layer_specs=[one_layer] * get_num_layers_to_build(config, vp_stage=vp_stage), layer_norm=SequenceParallelNorm
        )
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec,
        vocab_size=shape.vocab_size,
        max_sequence_length=shape.seq_length,
        position_embedding_type="rope",
        parallel_output=parallel_output,
        pre_process=pre_process,
        post_process=post_process,
        vp_stage=vp_stage,
    )
    if parallel_output and post_process:
        # The full logits for the comparisons, gathered after the model (its
        # backward takes this rank's shard), where no adapter sits.
        model.register_forward_hook(_gather_logits_hook)
    if cpu.is_active():
        # Building may import megatron modules that were not loaded before.
        cpu.patch_loaded_modules()
    return model


def dense_inputs(case: Any, tp: int, tp_rank: int, device: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input ids, position ids, decoder input) for the case on this TP rank: zero ids, positions 0..s-1,
    and the seeded (s, b, h) hidden states in the model's dtype, this rank's sequence shard under SP."""
    s, b, h = case.shape.seq_length, case.shape.micro_batch_size, case.shape.hidden_size
    ids = torch.zeros(b, s, dtype=torch.long, device=device)
    pos = torch.arange(s, device=device).unsqueeze(0).expand(b, s)
    full_x = seeded_tensor(case.seed, "input", (s, b, h)).to(device=device, dtype=case.model_dtype)
    return ids, pos, full_x.chunk(tp, dim=0)[tp_rank] if case.layout.sp else full_x


def causal_mask(seq_length: int) -> torch.Tensor:
    """megatron's boolean attention mask: True where attention is masked out."""
    return torch.ones(1, 1, seq_length, seq_length, dtype=torch.bool).triu(1)
