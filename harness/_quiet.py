"""Silence the known, harmless start-up noise of megatron-core and torch on CPU in rank processes.

Imported first in every rank process (forkserver preload) so that a failing
example's report is not buried under hundreds of lines of "Apex is not
installed" from every rank. Only these specific messages are filtered.
"""

import logging
import warnings

_MESSAGES = (
    r".*Apex is not installed.*",
    r".*Transformer Engine and Apex are not installed.*",
    r".*absl\.logging is not installed.*",
    r".*full scope is deprecated.*",
    r".*CUDA_DEVICE_MAX_CONNECTIONS.*",
    r".*all_gather_into_tensor. is deprecated.*",
    r".*reduce_scatter_tensor. is deprecated.*",
    # float64 models: megatron keeps norm weights in float32; torch promotes.
    r".*Mismatch dtype between input and weight.*",
)

for _pattern in _MESSAGES:
    warnings.filterwarnings("ignore", message=_pattern)

# On CPU the "CUDA" RNG state megatron's tracker forks is the CPU state
# (harness.cpu), so its "CPU RNG state changed within GPU RNG context"
# check fires on every draw inside a fork: expected, not a problem.
for _name in ("torch.utils.cpp_extension", "megatron.core.models.gpt.gpt_model", "megatron.core.tensor_parallel.random"):
    logging.getLogger(_name).setLevel(logging.ERROR)


_log = logging.getLogger("lora_harness")


def quiet_parent() -> None:
    """In the CLI/pytest process: megatron-core's import-time notices (no Apex, no TE) are logged once at debug level.

    They say nothing about the implementation under test; a user who wants
    them runs with logging at DEBUG for ``lora_harness``.
    """
    import re

    patterns = [re.compile(p) for p in _MESSAGES]
    previous = warnings.showwarning
    seen: set[str] = set()

    def showwarning(message, category, filename, lineno, file=None, line=None):  # type: ignore[no-untyped-def]
        text = str(message)
        if any(p.match(text) for p in patterns) or "megatron" in str(filename):
            if text not in seen:
                seen.add(text)
                _log.debug("suppressed import-time notice from %s:%s: %s", filename, lineno, text)
            return
        previous(message, category, filename, lineno, file, line)

    warnings.showwarning = showwarning
    for _pattern in _MESSAGES:
        warnings.filterwarnings("default", message=_pattern)
