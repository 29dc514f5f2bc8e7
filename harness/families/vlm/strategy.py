"""The VLM family's hypothesis strategies: LLaVA shapes, patterns reaching vision tower and projection, whole VLM cases."""

from __future__ import annotations

from typing import Any, Optional

from hypothesis import strategies as st

from harness.contract import DEFAULT_TARGET_MODULES, Capabilities
from harness.layouts import ParallelLayout
from harness.strategies import pick
from harness.families.vlm.case import VLMCase

__all__ = ["vlm_shapes", "vlm_target_patterns", "vlm_cases"]

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
def vlm_shapes(draw: Any, tp: int = 1, row: Optional[dict[str, Any]] = None, stages: int = 1) -> Any:
    """A tiny LLaVA that TP=tp can shard: one layer per tower, hidden sizes 8-32, a 4x4 or 8x8 image of 4x4 patches."""
    from harness.families.vlm.model import VLMShape

    heads = tp * draw(st.integers(1, 2))
    vision_heads = tp * draw(st.integers(1, 2))
    return VLMShape(
        num_layers=stages,  # one language layer per pipeline stage
        hidden_size=heads * draw(st.sampled_from([4, 8])),
        num_attention_heads=heads,
        num_query_groups=heads,
        ffn_hidden_size=tp * 4 * draw(st.integers(1, 2)),
        vocab_size=tp * draw(st.integers(4, 8)),
        # The image token and at least tp text tokens (one per vocabulary shard).
        seq_length=1 + tp * draw(st.integers(1, 2)),
        micro_batch_size=draw(st.integers(1, 2)),
        gated_linear_unit=pick(draw, row, "gated", st.booleans()),
        add_bias_linear=pick(draw, row, "bias", st.booleans()),
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
        shape=draw(vlm_shapes(tp, row, stages=layout.stages)),
        lora=lora,
        seed=draw(st.integers(0, 2**31 - 1)),
        layout=layout,
        impl=impl,
        contract=caps.contract,
    )
