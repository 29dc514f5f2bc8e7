"""The MoE family: megatron-core's GPTModel with an MoE layer (router, dispatcher, routed and shared experts).

Files: ``model.py`` (MoEShape, the model builder, a torch grouped linear for
TEGroupedMLP on CPU, routing counters), ``case.py``, ``strategy.py``,
``layouts.py`` (TP x EP x ETP with SP), ``design.py``, ``tasks.py`` (the
forward/backward task with the expert adapter table and the bad-input
task), ``init.py``.
"""

from typing import Any, Optional

from harness.families import Family, register
from harness.families.moe.case import MoECase
from harness.families.moe.design import DESIGN
from harness.families.moe.init import run_moe_init_case
from harness.families.moe.layouts import layouts
from harness.families.moe.model import MoEShape, build_moe_gpt
from harness.families.moe.strategy import moe_cases
from harness.families.moe.tasks import run_moe_case, run_moe_error_case


def _requires(caps: Any) -> Optional[str]:
    return None if caps.experts else "does not declare expert (MoE) support"


FAMILY = register(Family(
    name="moe",
    description="megatron-core GPTModel with a mixture-of-experts layer",
    case_type=MoECase,
    shape_type=MoEShape,
    strategy=moe_cases,
    layouts=layouts,
    task=run_moe_case,
    error_task=run_moe_error_case,
    init_task=run_moe_init_case,
    builder=build_moe_gpt,
    design=DESIGN,
    # An MoE example costs several dense ones (a bigger world at most layouts, one more run for
    # the EP=1 comparison, an optimizer step), and its layout set is larger: half.
    example_share=0.5,
    requires=_requires,
))
