"""The VLM family: megatron-core's LLaVAModel (vision tower, projection, language model), for VLMLoRA's freezing.

Files: ``model.py`` (VLMShape, the LLaVA builder and its inputs, and the
contract's freezing expectations computed from names), ``case.py``,
``strategy.py``, ``layouts.py`` (TP only), ``design.py``, ``tasks.py``
(every freeze combination on one rank task). It has no bad-input or init
task: its property reads the forward task's records.
"""

from harness.families import Family, register
from harness.families.vlm.layouts import layouts

FAMILY = register(Family(
    name="vlm",
    description="megatron-core LLaVAModel",
    case_type="harness.families.vlm.case:VLMCase",
    shape_type="harness.families.vlm.model:VLMShape",
    strategy="harness.families.vlm.strategy:vlm_cases",
    layouts=layouts,
    task="harness.families.vlm.tasks:run_vlm_case",
    builder="harness.families.vlm.model:build_vlm",
    design="harness.families.vlm.design:DESIGN",
    # A VLM example loops over all 16 freeze combinations itself (a fresh LLaVA each): a fifth.
    example_share=0.2,
))
