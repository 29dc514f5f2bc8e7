"""The dense family: megatron-core's GPTModel, tiny, at every TP / SP / data-parallel layout.

Files: ``model.py`` (the shape and the model builder), ``case.py`` (the
case, the base of every family's case), ``strategy.py`` (hypothesis
strategies), ``layouts.py`` (the layout set), ``design.py`` (the designed
features), ``tasks.py`` (the forward/backward and bad-input rank tasks),
``init.py`` (the init rank task).
"""

from harness.families import Family, register
from harness.families.gpt.case import GPTCase
from harness.families.gpt.design import DESIGN
from harness.families.gpt.init import run_init_case
from harness.families.gpt.layouts import layouts
from harness.families.gpt.model import GPTShape, build_gpt
from harness.families.gpt.strategy import gpt_cases
from harness.families.gpt.tasks import run_error_case, run_gpt_case

FAMILY = register(Family(
    name="gpt",
    description="dense megatron-core GPTModel",
    case_type=GPTCase,
    shape_type=GPTShape,
    strategy=gpt_cases,
    layouts=layouts,
    task=run_gpt_case,
    error_task=run_error_case,
    init_task=run_init_case,
    builder=build_gpt,
    design=DESIGN,
    example_share=1.0,
    bare_cells=True,
))
