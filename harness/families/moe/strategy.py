"""The MoE family's hypothesis strategies: expert shapes EP and ETP can split, expert targets, whole MoE cases."""

from __future__ import annotations

import math
from typing import Any, Optional

from hypothesis import strategies as st

from harness.cases import parse_dtype
from harness.contract import DEFAULT_TARGET_MODULES, Capabilities
from harness.design import DROPOUT_P
from harness.layouts import ParallelLayout
from harness.strategies import ints, pick
from harness.families.moe.case import MoECase

__all__ = ["moe_shapes", "moe_target_patterns", "moe_cases"]

_MOE_TARGETS = (
    "*.experts.*linear_fc1",
    "*.experts.*linear_fc2",
    "*shared_experts.linear_fc*",
    "*.layers.0.*linear_fc2",
)


def moe_target_patterns() -> st.SearchStrategy[dict[str, list[str]]]:
    """target_modules / exclude_modules for MoE models, expert and shared-expert patterns included."""
    target_mode = st.one_of(
        st.just(list(DEFAULT_TARGET_MODULES)),
        st.lists(st.sampled_from(["linear_fc1", "linear_fc2", "linear_qkv"]), min_size=1, max_size=3, unique=True),
        st.lists(st.sampled_from(_MOE_TARGETS), min_size=1, max_size=3, unique=True),
    ).map(lambda t: {"target_modules": t, "exclude_modules": []})
    exclude_mode = st.lists(
        st.sampled_from(["linear_qkv", "linear_proj", "output_layer", "*shared_experts*"]), min_size=1, max_size=3, unique=True
    ).map(lambda e: {"target_modules": [], "exclude_modules": e})
    return st.one_of(target_mode, target_mode, exclude_mode)


@st.composite
def moe_shapes(draw: Any, layout: ParallelLayout, grouped_experts: bool = True, row: Optional[dict[str, Any]] = None) -> Any:
    """A tiny MoE GPT the layout can shard, with enough tokens that routing reaches every expert.

    Experts are divisible by EP, expert widths by ETP, the shared expert's
    by TP; the sequence is split over TP (MoE at TP > 1 runs with sequence
    parallelism). At least five token-to-expert assignments per expert
    (``seq * batch * topk >= 5 * experts``) and a router over at least four
    features make it likely that every expert gets tokens;
    ``tests/families/test_moe_family.py`` measures how often (at least 80% of draws).
    A designed ``row`` fixes the expert kind, shared experts, the
    dispatcher and the gated MLP, with two experts per EP rank and top-2.
    """
    from harness.families.moe.model import MoEShape

    tp, ep, etp = layout.tp, layout.ep, layout.etp_size
    groups = tp * pick(draw, row, "query_groups", st.integers(1, 2))
    heads = groups * draw(st.sampled_from([1, 2]))
    head_dim = draw(st.sampled_from([4, 8]))  # a router over 2 features leaves experts unchosen
    floor = row is not None
    experts = ep * draw(st.sampled_from(([2, 4] if ep == 1 else [2]) if floor else ([1, 2, 4] if ep == 1 else [1, 2])))
    experts = max(experts, 2)
    topk = draw(ints(floor, 1, min(experts, 3), 2))
    batch = draw(st.integers(1, 2))
    need = math.ceil(5 * experts / (topk * batch))
    seq_unit = tp
    seq = seq_unit * max(draw(st.integers(1, 3)), math.ceil(need / seq_unit))
    if row is not None and "shared_experts" in row:
        shared = 2 * tp if row["shared_experts"] else None
    else:
        shared = draw(st.one_of(st.none(), st.sampled_from([2, 4]).map(lambda k: k * tp)))
    if row is not None and "expert_kind" in row:
        grouped = row["expert_kind"] == "grouped"
    else:
        grouped = draw(st.booleans()) if grouped_experts else False
    dispatcher = pick(draw, row, "dispatcher", st.sampled_from(["allgather", "alltoall"]))
    # megatron's shared-expert overlap: with a shared expert and the alltoall dispatcher only. A designed
    # row's plainest draw is the first value, so every designed row with a shared expert and alltoall
    # runs the overlap path, and those with allgather the plain shared-expert path (the dispatcher
    # changes nothing for the shared expert's adapters); drawn examples take either.
    overlap = False
    if shared is not None and dispatcher == "alltoall":
        overlap = draw(st.sampled_from([True, False]))
    return MoEShape(
        # Under a pipeline every stage and chunk holds one layer.
        num_layers=draw(st.integers(1, 2)) if layout.stages == 1 else layout.stages,
        hidden_size=heads * head_dim,
        num_attention_heads=heads,
        num_query_groups=groups,
        ffn_hidden_size=tp * 2,
        vocab_size=tp * draw(st.integers(2, 4)),
        seq_length=seq,
        micro_batch_size=batch,
        gated_linear_unit=pick(draw, row, "gated", st.booleans()),
        # Biased experts only when grouped: megatron-core 0.19.2's SequentialMLP
        # adds the expert bias in place on fc2's output, which at ETP=EP=1 is
        # the very tensor its size-1 all-reduce returned (a view autograd
        # forbids modifying) - a megatron failure with or without LoRA.
        # megatron-core also refuses biased experts at ETP > 1.
        add_bias_linear=False if shared is not None or not grouped or etp > 1 else draw(st.booleans()),
        num_experts=experts,
        moe_router_topk=topk,
        moe_ffn_hidden_size=etp * draw(st.integers(1, 3)) * 2,
        shared_expert_ffn_hidden_size=shared,
        dispatcher=dispatcher,
        grouped=grouped,
        shared_expert_overlap=bool(overlap),
    )


@st.composite
def moe_cases(
    draw: Any, layout: ParallelLayout, impl: str = "lora.megatron", capabilities: Optional[Capabilities] = None,
    row: Optional[dict[str, Any]] = None,
) -> MoECase:
    """One MoE example for a layout: shape, LoRA config (expert flags included), seed, mode.

    The base model runs in float64: routing picks the top-k experts by
    score, and in float32 two layouts' summation orders can flip a near tie,
    sending a token to another expert (a difference no tolerance can
    absorb, and no LoRA bug). Dropout is drawn in training and eval: the
    value-keyed masks of ``harness.dropout`` make expert adapters drop the
    same elements at every layout. A designed ``row`` (``harness.design``)
    fixes its features; the rest is drawn as usual.
    """
    from harness.design import targets_for

    caps = capabilities or Capabilities()
    shape = draw(moe_shapes(layout, grouped_experts=caps.grouped_experts, row=row))
    topk = shape.moe_router_topk
    normalize = pick(draw, row, "normalize_moe_lora", st.booleans())
    unit = math.lcm(layout.tp, topk * layout.etp_size) if normalize else math.lcm(layout.tp, layout.etp_size)
    # Patterns that adapt nothing (only shared experts, in a model without
    # them) would make a vacuous example: not drawn (the warning they must
    # raise is errors_follow_spec's).
    only_shared = ["*shared_experts.linear_fc*"]
    if row is not None and "targets" in row:
        lora = targets_for("moe", row["targets"], shape.shared_expert_ffn_hidden_size is not None)
    else:
        lora = dict(draw(moe_target_patterns().filter(
            lambda p: shape.shared_expert_ffn_hidden_size is not None or p["target_modules"] != only_shared)))
    dtypes = [d for d in caps.lora_dtypes if d in (None, "float64")] or [None]
    training = pick(draw, row, "training", st.sampled_from([True, True, True, False]))
    init_a, init_b = row["init"] if row is not None and "init" in row else (None, None)
    if row is not None and "dropout" in row:
        dropout = 0.0 if row["dropout"] == "none" else DROPOUT_P
        position = row["dropout"] if row["dropout"] != "none" else draw(st.sampled_from(["pre", "post"]))
    else:
        dropout = draw(st.sampled_from([0.0, 0.0, 0.1, 0.5]))
        position = draw(st.sampled_from(["pre", "post"]))
    lora.update(
        dim=unit * draw(st.integers(1, 2)),
        alpha=draw(st.sampled_from([1, 4, 16])),
        # Exact through harness.dropout's value-keyed masks (float64 values).
        dropout=dropout,
        dropout_position=position,
        lora_A_init_method=init_a or draw(st.sampled_from(caps.init_methods)),
        lora_B_init_method=init_b or draw(st.sampled_from(caps.init_methods)),
        normalize_moe_lora=normalize,
        # SPEC's default, and the EP-sensitive case (broadcast, gradient sum): two in three.
        share_expert_adapters=pick(draw, row, "share_expert_adapters", st.sampled_from([True, True, False])),
    )
    return MoECase(
        shape=shape,
        lora=lora,
        seed=draw(st.integers(0, 2**31 - 1)),
        layout=layout,
        impl=impl,
        training=training,
        model_dtype=parse_dtype("float64"),
        lora_dtype=parse_dtype(pick(draw, row, "lora_dtype", st.sampled_from(dtypes))),
        contract=caps.contract,
    )


# ------------------------------------------------------------------ VLM

# Patterns over a LLaVA's linears that reach into the vision tower
# (``vision_model.decoder.layers.0...``) and the projection
# (``vision_projection.encoder.linear_fc1/2``). Each selects linears only
# (``*vision_projection*`` would select the projector itself, a TypeError by
# SPEC) and none is anchored at the start, so the model, ``[model]`` and a
# wrapper's ``.llava_model`` (names then start with ``llava_model.``) select
# the same modules.
