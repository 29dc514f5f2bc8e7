"""What ranks execute, per model family. Each task returns one typed record (``harness.results``).

Tasks run on every rank of a pool (``harness.pool``); they only execute:
the example was drawn in the parent and the comparison is made there.
``TASKS`` maps a case family to its forward/backward task, ``ERROR_TASKS``
to its bad-input task (the vlm family has none: its property
reads only the forward task's records).
"""

from harness.tasks.gpt import run_error_case, run_gpt_case
from harness.tasks.moe import run_moe_case, run_moe_error_case
from harness.tasks.vlm import run_vlm_case

__all__ = ["run_gpt_case", "run_error_case", "run_moe_case", "run_moe_error_case", "run_vlm_case", "TASKS", "ERROR_TASKS"]

TASKS = {"gpt": run_gpt_case, "moe": run_moe_case, "vlm": run_vlm_case}
ERROR_TASKS = {"gpt": run_error_case, "moe": run_moe_error_case}
