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



from harness.contract import DEFAULT_TARGET_MODULES, Capabilities
from harness.layouts import ParallelLayout

__all__ = ["pick", "ints", "lora_configs", "target_patterns", "cases_for", "DEFAULT_TARGET_MODULES"]

DEFAULT_TARGET_MODULES = list(DEFAULT_TARGET_MODULES)


def pick(draw: Any, row: Optional[dict[str, Any]], name: str, strategy: st.SearchStrategy[Any]) -> Any:
    """The row's value of feature ``name`` (a designed example, ``harness.design``), else a draw."""
    if row is not None and name in row:
        return row[name]
    return draw(strategy)


def ints(floor: bool, lo: int, hi: int, designed_lo: int) -> st.SearchStrategy[int]:
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
        dim=tp * draw(ints(row is not None, 1, 4, 2)),
        alpha=draw(st.sampled_from([1, 2, 8, 16, 32])),
        dropout_position=position if position in ("pre", "post") else draw(st.sampled_from(["pre", "post"])),
        lora_A_init_method=init_a or draw(st.sampled_from(caps.init_methods)),
        lora_B_init_method=init_b or draw(st.sampled_from(caps.init_methods)),
        lora_dtype=pick(draw, row, "lora_dtype", st.sampled_from(dtypes)),
    )
    return cfg


def cases_for(family: str, layout: ParallelLayout, impl: str, capabilities: Optional[Capabilities] = None,
              row: Optional[dict[str, Any]] = None, loop: bool = False, checkpoint: bool = False) -> st.SearchStrategy[Any]:
    """The case strategy of a model family (its ``Family.strategy``); with a designed ``row``
    (``harness.design``), its features fixed. ``loop``: also draw a training loop
    (``harness.training``), after everything else, for the properties that read one: the other
    features keep their draws, so every property at a layout still draws the same examples, and the
    properties that read no loop neither carry nor shrink one. ``checkpoint``: also draw the layout the
    checkpoint property loads at (``harness.checkpoint``), the same way."""
    from harness.families import get_family

    cases = get_family(family).strategy(layout, impl, capabilities, row)
    if loop:
        from harness.training import training_loops

        cases = st.tuples(cases, training_loops(layout, row, family)).map(lambda pair: pair[0].with_(loop=pair[1]))
    if checkpoint:
        from harness.checkpoint import load_layout_strategy

        cases = cases.flatmap(lambda case: load_layout_strategy(family, layout, case, row).map(
            lambda y: case.with_(load_layout=y)))
    return cases
