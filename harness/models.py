"""Tiny real megatron-core models for the checks, built for the active layout.

``GPTShape`` is everything that fixes a model's full (unsharded) weights;
``build_gpt`` builds megatron-core's own ``GPTModel`` (local layer spec,
RMSNorm, RoPE, grouped-query attention, optional gated MLP) for whatever
``parallel_state`` currently says, so the same shape can be built at every
layout and loaded with the same full weights (see ``harness.sharding``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["GPTShape", "ShapeError", "transformer_config", "build_gpt", "causal_mask"]


class ShapeError(ValueError):
    """A model shape that cannot be laid out at the requested TP size."""


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
        for field, ok, rule in rules:
            if not ok:
                raise ShapeError(f"GPTShape.{field}={getattr(self, field)} must be {rule}")

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


def build_gpt(
    shape: GPTShape, *, tp: int, sequence_parallel: bool = False, params_dtype: torch.dtype = torch.float32, **config_overrides: Any
) -> Any:
    """megatron-core GPTModel for the active parallel_state (logits gathered over TP)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from harness import cpu

    shape.check(tp)
    config = transformer_config(
        shape, tp=tp, sequence_parallel=sequence_parallel, params_dtype=params_dtype, **config_overrides
    )
    model = GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=shape.vocab_size,
        max_sequence_length=shape.seq_length,
        position_embedding_type="rope",
        parallel_output=False,
    )
    if cpu.is_active():
        # Building may import megatron modules that were not loaded before.
        cpu.patch_loaded_modules()
    return model


def causal_mask(seq_length: int) -> torch.Tensor:
    """megatron's boolean attention mask: True where attention is masked out."""
    return torch.ones(1, 1, seq_length, seq_length, dtype=torch.bool).triu(1)
