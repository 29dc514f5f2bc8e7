"""The dense family's hypothesis strategies: GPT shapes TP can shard and whole dense cases."""

from __future__ import annotations

from typing import Any, Optional

import torch
from hypothesis import strategies as st

from harness.cases import parse_dtype
from harness.contract import Capabilities
from harness.design import DROPOUT_P
from harness.layouts import ParallelLayout
from harness.strategies import ints, lora_configs, pick
from harness.families.gpt.case import GPTCase
from harness.families.gpt.model import GPTShape

__all__ = ["gpt_shapes", "gpt_cases"]

@st.composite
def gpt_shapes(draw: Any, tp: int = 1, sequence_parallel: bool = False, row: Optional[dict[str, Any]] = None,
               stages: int = 1) -> GPTShape:
    """A tiny GPT that TP=tp can shard: heads, query groups, ffn and vocab divisible by tp.

    Under sequence parallelism the sequence is split over TP too. With a
    designed ``row`` (``harness.design``) the gated MLP and biases are the
    row's, and sizes start where every check has power: two layers, two
    heads per query group (GQA), head dim 4, a batch of two, four tokens.
    Under a pipeline (``stages`` = pp * vpp > 1) every stage and chunk gets
    one or two layers.
    """
    floor = row is not None
    groups = tp * pick(draw, row, "query_groups", st.integers(1, 2))
    heads = groups * draw(st.sampled_from([2, 1] if floor else [1, 2]))
    head_dim = draw(st.sampled_from([4, 8] if floor else [2, 4, 8]))  # RoPE rotates pairs: even
    return GPTShape(
        num_layers=draw(ints(floor, 1, 2, 2)) if stages == 1 else stages * draw(st.integers(1, 2)),
        hidden_size=heads * head_dim,
        num_attention_heads=heads,
        num_query_groups=groups,
        ffn_hidden_size=tp * draw(ints(floor, 1, 6, 2)) * 2,
        vocab_size=tp * draw(ints(floor, 2, 8, 4)),
        seq_length=tp * draw(ints(floor, 1, 3, 2)) if sequence_parallel else draw(ints(floor, 1, 6, 4)),
        micro_batch_size=draw(ints(floor, 1, 2, 2)),
        gated_linear_unit=pick(draw, row, "gated", st.booleans()),
        add_bias_linear=pick(draw, row, "bias", st.booleans()),
    )


@st.composite
def gpt_cases(
    draw: Any, layout: ParallelLayout, impl: str = "lora.megatron", capabilities: Optional[Capabilities] = None,
    row: Optional[dict[str, Any]] = None,
) -> GPTCase:
    """One dense-GPT example for a layout: shape, LoRA config, seed, train/eval mode, dtypes.

    Dropout is drawn in eval mode (``training=False``, inference), where it
    must act as identity, and in training with float64 values, where
    ``harness.dropout``'s value-keyed masks make the sharded and the
    reference run drop exactly the same elements. The base model runs in
    float32 (what users run), float64 (where the tolerance can be 1e-9; see
    ``harness.compare``) or bfloat16 (compared by error ratios against a
    float64 reference). Training draws one or two micro-batches: gradients
    must accumulate. A designed ``row`` (``harness.design``) fixes its
    features; the rest is drawn as usual.
    """
    caps = capabilities or Capabilities()
    tp = layout.tp
    # Training first: most bugs live in gradients, and the simplest example trains.
    training = pick(draw, row, "training", st.sampled_from([True, True, False]))
    lora = dict(draw(lora_configs(tp, caps, row)))
    lora_dtype = parse_dtype(lora.pop("lora_dtype"))
    model_dtype = parse_dtype(pick(draw, row, "model_dtype", st.sampled_from(["float32", "float64", "float64", "bfloat16"])))
    if row is not None and "dropout" in row:
        lora["dropout"] = 0.0 if row["dropout"] == "none" else DROPOUT_P
    else:
        lora["dropout"] = draw(st.sampled_from([0.0, 0.1, 0.5] if not training else [0.0, 0.0, 0.1, 0.5]))
    if training and lora["dropout"] > 0 and row is None:
        # Dropout in training compares exactly through value-keyed masks
        # (harness.dropout), which need float64 values on both sides: half
        # the training examples are such.
        model_dtype = torch.float64
        exact = [d for d in caps.lora_dtypes if d in (None, "float64")]
        if exact:
            lora_dtype = parse_dtype(draw(st.sampled_from(exact)))
        else:
            lora["dropout"] = 0.0
    if lora_dtype == torch.float16:
        # float16 tops out at 65504: an adapter scale above 1 overflows its
        # gradients in examples the reference cannot compute either.
        lora["alpha"] = min(lora["alpha"], lora["dim"])
    if layout.sp and caps.a2a:
        lora["a2a_experimental"] = pick(draw, row, "a2a", st.booleans())
    return GPTCase(
        shape=draw(gpt_shapes(tp, sequence_parallel=layout.sp, row=row, stages=layout.stages)),
        lora=lora,
        seed=draw(st.integers(0, 2**31 - 1)),
        layout=layout,
        impl=impl,
        training=training,
        model_dtype=model_dtype,
        lora_dtype=lora_dtype,
        contract=caps.contract,
        micro_batches=pick(draw, row, "micro_batches", st.integers(1, 2)) if training else 1,
    )


# ------------------------------------------------------------------ MoE

# Patterns over an MoE GPT's linears: attention, routed experts
# (``...mlp.experts.local_experts.<i>.linear_fc1`` or ``...mlp.experts.linear_fc1``)
# and shared experts (``...mlp.shared_experts.linear_fc1``). Expert indices
# are never named: megatron names experts by their *local* index, so a
# pattern naming one would select different experts at different EP sizes.
