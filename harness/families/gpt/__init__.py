"""The dense family: megatron-core's GPTModel, tiny, at every TP / SP / data-parallel layout.

Files: ``model.py`` (the shape and the model builder), ``case.py`` (the
case, the base of every family's case), ``strategy.py`` (hypothesis
strategies), ``layouts.py`` (the layout set), ``design.py`` (the designed
features), ``tasks.py`` (the forward/backward and bad-input rank tasks),
``init.py`` (the init rank task).
"""

from harness.families import Family, register
from harness.families.gpt.layouts import layouts

FAMILY = register(Family(
    name="gpt",
    description="dense megatron-core GPTModel",
    case_type="harness.families.gpt.case:GPTCase",
    shape_type="harness.families.gpt.model:GPTShape",
    strategy="harness.families.gpt.strategy:gpt_cases",
    layouts=layouts,
    task="harness.families.gpt.tasks:run_gpt_case",
    error_task="harness.families.gpt.tasks:run_error_case",
    init_task="harness.families.gpt.init:run_init_case",
    switch_task="harness.families.gpt.switch:run_gpt_switch_case",
    recompute_task="harness.families.gpt.recompute:run_gpt_recompute_case",
    training_task="harness.families.gpt.training:run_gpt_training_case",
    checkpoint_save_task="harness.families.gpt.checkpoint:run_gpt_checkpoint_save",
    checkpoint_load_task="harness.families.gpt.checkpoint:run_gpt_checkpoint_load",
    builder="harness.families.gpt.model:build_gpt",
    design="harness.families.gpt.design:DESIGN",
    example_share=1.0,
    bare_cells=True,
))
