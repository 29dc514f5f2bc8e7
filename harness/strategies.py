"""Hypothesis strategies: model shapes, LoRA configs, seeds and whole cases for a layout.

Everything here is drawn in the parent (pytest or the CLI); ranks only
execute. Strategies draw only *valid* examples for the layout they are given
(shapes TP can shard, ranks TP can split); invalid inputs have their own
error-message tests. Sizes are small on purpose: a sharding bug shows at
hidden size 16 as well as at 4096, and shrinking needs small examples.
"""

from __future__ import annotations

from typing import Any, Optional

from hypothesis import strategies as st

import math

import torch

from harness.cases import GPTCase, MoECase, VLMCase, parse_dtype
from harness.contract import DEFAULT_TARGET_MODULES, INIT_METHODS, Capabilities
from harness.design import DROPOUT_P
from harness.layouts import ParallelLayout
from harness.models import GPTShape

__all__ = [
    "gpt_shapes", "lora_configs", "gpt_cases", "target_patterns", "cases_for",
    "moe_shapes", "moe_target_patterns", "moe_cases",
    "vlm_shapes", "vlm_target_patterns", "vlm_cases",
]

DEFAULT_TARGET_MODULES = list(DEFAULT_TARGET_MODULES)


def _pick(draw: Any, row: Optional[dict[str, Any]], name: str, strategy: st.SearchStrategy[Any]) -> Any:
    """The row's value of feature ``name`` (a designed example, ``harness.design``), else a draw."""
    if row is not None and name in row:
        return row[name]
    return draw(strategy)


def _ints(floor: bool, lo: int, hi: int, designed_lo: int) -> st.SearchStrategy[int]:
    """``integers(lo, hi)``, or from ``designed_lo`` for a designed example (sizes where every check has power)."""
    return st.integers(max(lo, designed_lo) if floor else lo, hi)

# Patterns that select linears only (a pattern that selects e.g. a whole
# attention block is a TypeError by SPEC, tested separately).
_WILDCARD_TARGETS = (
    "*.layers.0.*.linear_qkv",
    "*.layers.*.mlp.linear_fc*",
    "*linear_proj",
    "decoder.layers.0.self_attention.linear_qkv",
)


@st.composite
def gpt_shapes(draw: Any, tp: int = 1, sequence_parallel: bool = False, row: Optional[dict[str, Any]] = None) -> GPTShape:
    """A tiny GPT that TP=tp can shard: heads, query groups, ffn and vocab divisible by tp.

    Under sequence parallelism the sequence is split over TP too. With a
    designed ``row`` (``harness.design``) the gated MLP and biases are the
    row's, and sizes start where every check has power: two layers, two
    heads per query group (GQA), head dim 4, a batch of two, four tokens.
    """
    floor = row is not None
    groups = tp * _pick(draw, row, "query_groups", st.integers(1, 2))
    heads = groups * draw(st.sampled_from([2, 1] if floor else [1, 2]))
    head_dim = draw(st.sampled_from([4, 8] if floor else [2, 4, 8]))  # RoPE rotates pairs: even
    return GPTShape(
        num_layers=draw(_ints(floor, 1, 2, 2)),
        hidden_size=heads * head_dim,
        num_attention_heads=heads,
        num_query_groups=groups,
        ffn_hidden_size=tp * draw(_ints(floor, 1, 6, 2)) * 2,
        vocab_size=tp * draw(_ints(floor, 2, 8, 4)),
        seq_length=tp * draw(_ints(floor, 1, 3, 2)) if sequence_parallel else draw(_ints(floor, 1, 6, 4)),
        micro_batch_size=draw(_ints(floor, 1, 2, 2)),
        gated_linear_unit=_pick(draw, row, "gated", st.booleans()),
        add_bias_linear=_pick(draw, row, "bias", st.booleans()),
    )


def target_patterns() -> st.SearchStrategy[dict[str, list[str]]]:
    """target_modules / exclude_modules pairs, in both modes, with wildcards."""
    subsets = st.lists(st.sampled_from(DEFAULT_TARGET_MODULES), min_size=1, max_size=4, unique=True)
    wild = st.lists(st.sampled_from(_WILDCARD_TARGETS), min_size=1, max_size=2, unique=True)
    target_mode = st.one_of(
        st.just(list(DEFAULT_TARGET_MODULES)), subsets, wild
    ).map(lambda t: {"target_modules": t, "exclude_modules": []})
    # Exclude mode adapts every linear-type module, the output layer included.
    exclude_mode = st.lists(st.sampled_from(DEFAULT_TARGET_MODULES + ["output_layer"]), min_size=1, max_size=3, unique=True).map(
        lambda e: {"target_modules": [], "exclude_modules": e}
    )
    return st.one_of(target_mode, exclude_mode)


@st.composite
def lora_configs(draw: Any, tp: int = 1, capabilities: Optional[Capabilities] = None,
                 row: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """LoRA keyword arguments valid at TP=tp (dim divisible by tp), inside ``capabilities``.

    ``lora_dtype`` is a dtype name here (None: the base weight's dtype).
    A designed ``row`` fixes the targets, the init methods, the adapter
    dtype and the dropout position, and starts the rank at 2 per TP rank.
    """
    from harness.design import targets_for

    caps = capabilities or Capabilities()
    if row is not None and "targets" in row:
        cfg = targets_for("gpt", row["targets"])
    else:
        cfg = dict(draw(target_patterns()))
    # 16-bit adapters are compared by error ratios against a float64
    # reference (harness.compare.compare_low_precision): two correct layouts
    # can differ by ~15% of a gradient's largest entry where terms cancel,
    # which no fixed tolerance separates from a sharding bug.
    dtypes = list(caps.lora_dtypes) or [None]
    init_a, init_b = row["init"] if row is not None and "init" in row else (None, None)
    position = row.get("dropout") if row is not None else None
    cfg.update(
        dim=tp * draw(_ints(row is not None, 1, 4, 2)),
        alpha=draw(st.sampled_from([1, 2, 8, 16, 32])),
        dropout_position=position if position in ("pre", "post") else draw(st.sampled_from(["pre", "post"])),
        lora_A_init_method=init_a or draw(st.sampled_from(caps.init_methods)),
        lora_B_init_method=init_b or draw(st.sampled_from(caps.init_methods)),
        lora_dtype=_pick(draw, row, "lora_dtype", st.sampled_from(dtypes)),
    )
    return cfg


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
    training = _pick(draw, row, "training", st.sampled_from([True, True, False]))
    lora = dict(draw(lora_configs(tp, caps, row)))
    lora_dtype = parse_dtype(lora.pop("lora_dtype"))
    model_dtype = parse_dtype(_pick(draw, row, "model_dtype", st.sampled_from(["float32", "float64", "float64", "bfloat16"])))
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
        lora["a2a_experimental"] = _pick(draw, row, "a2a", st.booleans())
    return GPTCase(
        shape=draw(gpt_shapes(tp, sequence_parallel=layout.sp, row=row)),
        lora=lora,
        seed=draw(st.integers(0, 2**31 - 1)),
        layout=layout,
        impl=impl,
        training=training,
        model_dtype=model_dtype,
        lora_dtype=lora_dtype,
        contract=caps.contract,
        micro_batches=_pick(draw, row, "micro_batches", st.integers(1, 2)) if training else 1,
    )


# ------------------------------------------------------------------ MoE

# Patterns over an MoE GPT's linears: attention, routed experts
# (``...mlp.experts.local_experts.<i>.linear_fc1`` or ``...mlp.experts.linear_fc1``)
# and shared experts (``...mlp.shared_experts.linear_fc1``). Expert indices
# are never named: megatron names experts by their *local* index, so a
# pattern naming one would select different experts at different EP sizes.
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
    ``tests/test_moe_family.py`` measures how often (at least 80% of draws).
    A designed ``row`` fixes the expert kind, shared experts, the
    dispatcher and the gated MLP, with two experts per EP rank and top-2.
    """
    from harness.moe import MoEShape

    tp, ep, etp = layout.tp, layout.ep, layout.etp_size
    groups = tp * _pick(draw, row, "query_groups", st.integers(1, 2))
    heads = groups * draw(st.sampled_from([1, 2]))
    head_dim = draw(st.sampled_from([4, 8]))  # a router over 2 features leaves experts unchosen
    floor = row is not None
    experts = ep * draw(st.sampled_from(([2, 4] if ep == 1 else [2]) if floor else ([1, 2, 4] if ep == 1 else [1, 2])))
    experts = max(experts, 2)
    topk = draw(_ints(floor, 1, min(experts, 3), 2))
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
    return MoEShape(
        num_layers=draw(st.integers(1, 2)),
        hidden_size=heads * head_dim,
        num_attention_heads=heads,
        num_query_groups=groups,
        ffn_hidden_size=tp * 2,
        vocab_size=tp * draw(st.integers(2, 4)),
        seq_length=seq,
        micro_batch_size=batch,
        gated_linear_unit=_pick(draw, row, "gated", st.booleans()),
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
        dispatcher=_pick(draw, row, "dispatcher", st.sampled_from(["allgather", "alltoall"])),
        grouped=grouped,
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
    normalize = _pick(draw, row, "normalize_moe_lora", st.booleans())
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
    training = _pick(draw, row, "training", st.sampled_from([True, True, True, False]))
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
        share_expert_adapters=_pick(draw, row, "share_expert_adapters", st.sampled_from([True, True, False])),
    )
    return MoECase(
        shape=shape,
        lora=lora,
        seed=draw(st.integers(0, 2**31 - 1)),
        layout=layout,
        impl=impl,
        training=training,
        model_dtype=parse_dtype("float64"),
        lora_dtype=parse_dtype(_pick(draw, row, "lora_dtype", st.sampled_from(dtypes))),
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
_VLM_TARGETS = (
    "*vision_model*linear_qkv",
    "*vision_model.*linear_fc2",
    "*vision_projection.*linear_fc*",
    "*vision_projection.encoder.linear_fc2",
    "*.decoder.layers.0.*linear_fc1",
    "*language_model.*linear_proj",
    "output_layer",
)
_VLM_EXCLUDES = ("*language_model*", "*vision_model*", "*vision_projection*", "linear_qkv", "*.mlp.linear_fc*", "output_layer")


def vlm_target_patterns() -> st.SearchStrategy[dict[str, list[str]]]:
    """target_modules / exclude_modules for a LLaVA, reaching the vision tower and the projection."""
    target_mode = st.one_of(
        st.lists(st.sampled_from(_VLM_TARGETS), min_size=1, max_size=3, unique=True),
        st.lists(st.sampled_from(list(DEFAULT_TARGET_MODULES)), min_size=1, max_size=2, unique=True),
    ).map(lambda t: {"target_modules": t, "exclude_modules": []})
    exclude_mode = st.lists(st.sampled_from(_VLM_EXCLUDES), min_size=1, max_size=2, unique=True).map(
        lambda e: {"target_modules": [], "exclude_modules": e}
    )
    return st.one_of(target_mode, exclude_mode)


@st.composite
def vlm_shapes(draw: Any, tp: int = 1, row: Optional[dict[str, Any]] = None) -> Any:
    """A tiny LLaVA that TP=tp can shard: one layer per tower, hidden sizes 8-32, a 4x4 or 8x8 image of 4x4 patches."""
    from harness.vlm import VLMShape

    heads = tp * draw(st.integers(1, 2))
    vision_heads = tp * draw(st.integers(1, 2))
    return VLMShape(
        num_layers=1,
        hidden_size=heads * draw(st.sampled_from([4, 8])),
        num_attention_heads=heads,
        num_query_groups=heads,
        ffn_hidden_size=tp * 4 * draw(st.integers(1, 2)),
        vocab_size=tp * draw(st.integers(4, 8)),
        # The image token and at least tp text tokens (one per vocabulary shard).
        seq_length=1 + tp * draw(st.integers(1, 2)),
        micro_batch_size=draw(st.integers(1, 2)),
        gated_linear_unit=_pick(draw, row, "gated", st.booleans()),
        add_bias_linear=_pick(draw, row, "bias", st.booleans()),
        vision_hidden_size=vision_heads * draw(st.sampled_from([4, 8])),
        vision_num_attention_heads=vision_heads,
        vision_ffn_hidden_size=tp * 4 * draw(st.integers(1, 2)),
        img_size=draw(st.sampled_from([4, 8])),
        patch_dim=4,
        projection_ffn_hidden_size=tp * 4 * draw(st.integers(1, 2)),
    )


@st.composite
def vlm_cases(
    draw: Any, layout: ParallelLayout, impl: str = "lora.megatron", capabilities: Optional[Capabilities] = None,
    row: Optional[dict[str, Any]] = None,
) -> VLMCase:
    """One LLaVA example for a layout: shape, patterns into every part, dim, alpha, init, seed.

    The task itself covers the 16 freeze-flag and training combinations.
    Neither init method is ``zero`` and the scale alpha/dim is at most 2,
    so one optimizer step reaches every trainable parameter (a zero B
    leaves A's gradient zero; a large scale saturates attention).
    Dropout 0, float32, adapters in the base dtype: what is checked here is
    which parameters train, not numerics. A designed ``row``
    (``harness.design``) fixes the targets, the init methods and the MLP's
    gating and biases.
    """
    from harness.design import targets_for

    caps = capabilities or Capabilities()
    tp = layout.tp
    inits = [m for m in caps.init_methods if m != "zero"] or ["xavier"]
    dim = tp * draw(st.integers(1, 2))
    lora = targets_for("vlm", row["targets"]) if row is not None and "targets" in row else dict(draw(vlm_target_patterns()))
    init_a, init_b = row["init"] if row is not None and "init" in row else (None, None)
    lora.update(
        dim=dim,
        alpha=dim * draw(st.sampled_from([1, 2])) // draw(st.sampled_from([1, 2])) or 1,
        dropout=0.0,
        lora_A_init_method=init_a or draw(st.sampled_from(inits)),
        lora_B_init_method=init_b or draw(st.sampled_from(inits)),
    )
    return VLMCase(
        shape=draw(vlm_shapes(tp, row)),
        lora=lora,
        seed=draw(st.integers(0, 2**31 - 1)),
        layout=layout,
        impl=impl,
        contract=caps.contract,
    )


# Case strategies per model family: (layout, impl, capabilities) -> strategy.
_CASES = {"gpt": gpt_cases, "moe": moe_cases, "vlm": vlm_cases}


def cases_for(family: str, layout: ParallelLayout, impl: str, capabilities: Optional[Capabilities] = None,
              row: Optional[dict[str, Any]] = None) -> st.SearchStrategy[Any]:
    """The case strategy of a model family; with a designed ``row`` (``harness.design``), its features fixed."""
    if family not in _CASES:
        raise ValueError(f"no case strategy for family {family!r}; known: {', '.join(_CASES)}")
    return _CASES[family](layout, impl, capabilities, row)
