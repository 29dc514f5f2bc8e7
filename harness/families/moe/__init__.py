"""The MoE family: megatron-core's GPTModel with an MoE layer (router, dispatcher, routed and shared experts).

Files: ``model.py`` (MoEShape, the model and stage builders, a torch grouped
linear for TEGroupedMLP on CPU, routing counters), ``case.py``, ``strategy.py``,
``layouts.py`` (TP x EP x ETP with SP, and EP x PP), ``design.py``, ``tasks.py``
(the forward/backward task with the expert adapter table and the bad-input
task), ``pipeline.py`` (the forward/backward task at a pipeline layout),
``stage.py`` (the adapted model or stage the other tasks start from),
``switch.py``, ``recompute.py``, ``training.py``, ``checkpoint.py``, ``init.py``.
"""

from typing import Any, Optional

from harness.families import Family, register
from harness.families.moe.layouts import layouts


def _requires(caps: Any) -> Optional[str]:
    return None if caps.experts else "does not declare expert (MoE) support"


FAMILY = register(Family(
    name="moe",
    description="megatron-core GPTModel with a mixture-of-experts layer",
    case_type="harness.families.moe.case:MoECase",
    shape_type="harness.families.moe.model:MoEShape",
    strategy="harness.families.moe.strategy:moe_cases",
    layouts=layouts,
    task="harness.families.moe.tasks:run_moe_case",
    error_task="harness.families.moe.tasks:run_moe_error_case",
    init_task="harness.families.moe.init:run_moe_init_case",
    switch_task="harness.families.moe.switch:run_moe_switch_case",
    recompute_task="harness.families.moe.recompute:run_moe_recompute_case",
    training_task="harness.families.moe.training:run_moe_training_case",
    checkpoint_save_task="harness.families.moe.checkpoint:run_moe_checkpoint_save",
    checkpoint_load_task="harness.families.moe.checkpoint:run_moe_checkpoint_load",
    builder="harness.families.moe.model:build_moe_gpt",
    design="harness.families.moe.design:DESIGN",
    # An MoE example costs several dense ones (a bigger world at most layouts, one more run for
    # the EP=1 comparison, an optimizer step), and its layout set is larger: half.
    example_share=0.5,
    requires=_requires,
))
