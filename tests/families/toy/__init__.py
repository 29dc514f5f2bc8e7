"""A toy model family: the README's worked example of adding one ("Adding a model family").

It is the dense GPTModel under another name, run only at TP 1 and 2 without
sequence parallelism, with a designed set of two features, its own case
type, and ``forward_matches`` opted in. Everything it needs is in this
folder; the only call into the harness is ``register`` below. Importing
this package registers it (a plugin package would do that through the
``lora_harness.families`` entry point group instead).
"""

from harness.families import Family, register
from harness.families.gpt.model import GPTShape, build_gpt
from harness.families.gpt.tasks import run_gpt_case
from tests.families.toy.case import ToyCase
from tests.families.toy.design import DESIGN
from tests.families.toy.layouts import layouts
from tests.families.toy.strategy import toy_cases

FAMILY = register(Family(
    name="toy",
    description="the dense GPTModel at TP 1 and 2 (the README's worked example)",
    case_type=ToyCase,
    shape_type=GPTShape,
    strategy=toy_cases,
    layouts=layouts,
    task=run_gpt_case,
    builder=build_gpt,
    design=DESIGN,
    example_share=0.5,
    properties=("forward_matches",),
))
