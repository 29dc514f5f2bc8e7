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

from harness.cases import GPTCase, parse_dtype
from harness.contract import DEFAULT_TARGET_MODULES, INIT_METHODS, Capabilities
from harness.layouts import ParallelLayout
from harness.models import GPTShape

__all__ = ["gpt_shapes", "lora_configs", "gpt_cases", "target_patterns", "cases_for"]

DEFAULT_TARGET_MODULES = list(DEFAULT_TARGET_MODULES)

# Patterns that select linears only (a pattern that selects e.g. a whole
# attention block is a TypeError by SPEC, tested separately).
_WILDCARD_TARGETS = (
    "*.layers.0.*.linear_qkv",
    "*.layers.*.mlp.linear_fc*",
    "*linear_proj",
    "decoder.layers.0.self_attention.linear_qkv",
)


@st.composite
def gpt_shapes(draw: Any, tp: int = 1, sequence_parallel: bool = False) -> GPTShape:
    """A tiny GPT that TP=tp can shard: heads, query groups, ffn and vocab divisible by tp.

    Under sequence parallelism the sequence is split over TP too.
    """
    groups = tp * draw(st.integers(1, 2))
    heads = groups * draw(st.sampled_from([1, 2]))
    head_dim = draw(st.sampled_from([2, 4, 8]))  # RoPE rotates pairs: even
    return GPTShape(
        num_layers=draw(st.integers(1, 2)),
        hidden_size=heads * head_dim,
        num_attention_heads=heads,
        num_query_groups=groups,
        ffn_hidden_size=tp * draw(st.integers(1, 6)) * 2,
        vocab_size=tp * draw(st.integers(2, 8)),
        seq_length=tp * draw(st.integers(1, 3)) if sequence_parallel else draw(st.integers(1, 6)),
        micro_batch_size=draw(st.integers(1, 2)),
        gated_linear_unit=draw(st.booleans()),
        add_bias_linear=draw(st.booleans()),
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
def lora_configs(draw: Any, tp: int = 1, capabilities: Optional[Capabilities] = None) -> dict[str, Any]:
    """LoRA keyword arguments valid at TP=tp (dim divisible by tp), inside ``capabilities``.

    ``lora_dtype`` is a dtype name here (None: the base weight's dtype).
    """
    caps = capabilities or Capabilities()
    cfg = dict(draw(target_patterns()))
    # 16-bit adapters are left to the dtype tests: rounding every adapter
    # product to 8 bits makes two correct layouts differ by up to ~15% of a
    # gradient's largest entry where terms cancel, which no fixed tolerance
    # separates from a real sharding bug.
    dtypes = [d for d in caps.lora_dtypes if d in (None, "float32", "float64")] or [None]
    cfg.update(
        dim=tp * draw(st.integers(1, 4)),
        alpha=draw(st.sampled_from([1, 2, 8, 16, 32])),
        dropout_position=draw(st.sampled_from(["pre", "post"])),
        lora_A_init_method=draw(st.sampled_from(caps.init_methods)),
        lora_B_init_method=draw(st.sampled_from(caps.init_methods)),
        lora_dtype=draw(st.sampled_from(dtypes)),
    )
    return cfg


@st.composite
def gpt_cases(
    draw: Any, layout: ParallelLayout, impl: str = "lora.megatron", capabilities: Optional[Capabilities] = None
) -> GPTCase:
    """One dense-GPT example for a layout: shape, LoRA config, seed, train/eval mode, dtypes.

    Dropout is drawn only in eval mode (``training=False``, inference), where
    it must act as identity: in training its masks are random per layout by
    nature, so a forward comparison would be meaningless. The base model runs
    in float32 (what users run) or float64 (where the tolerance can be 1e-9;
    see ``harness.compare``).
    """
    caps = capabilities or Capabilities()
    tp = layout.tp
    training = draw(st.booleans())
    lora = dict(draw(lora_configs(tp, caps)), dropout=0.0 if training else draw(st.sampled_from([0.0, 0.1, 0.5])))
    lora_dtype = parse_dtype(lora.pop("lora_dtype"))
    if layout.sp and caps.a2a:
        lora["a2a_experimental"] = draw(st.booleans())
    return GPTCase(
        shape=draw(gpt_shapes(tp, sequence_parallel=layout.sp)),
        lora=lora,
        seed=draw(st.integers(0, 2**31 - 1)),
        layout=layout,
        impl=impl,
        training=training,
        model_dtype=parse_dtype(draw(st.sampled_from(["float32", "float64"]))),
        lora_dtype=lora_dtype,
        contract=caps.contract,
    )


# Case strategies per model family: (layout, impl, capabilities) -> strategy.
_CASES = {"gpt": gpt_cases}


def cases_for(family: str, layout: ParallelLayout, impl: str, capabilities: Optional[Capabilities] = None) -> st.SearchStrategy[Any]:
    """The case strategy of a model family."""
    if family not in _CASES:
        raise ValueError(f"no case strategy for family {family!r}; known: {', '.join(_CASES)}")
    return _CASES[family](layout, impl, capabilities)
