"""What ranks execute, per model family. Each task returns one typed record (``harness.results``).

Tasks run on every rank of a pool (``harness.runner``); they only execute:
the example was drawn in the parent and the comparison is made there.
"""

from harness.tasks.gpt import run_error_case, run_gpt_case

__all__ = ["run_gpt_case", "run_error_case"]
