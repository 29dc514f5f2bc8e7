"""lora.megatron under another name: a correct implementation the harness does not know as its own control.

Any implementation other than ``lora.megatron`` gets ``lora.megatron`` as the
control of its failing examples (``harness.driver.control_impl``); this one
lets a test plant a harness defect and see it answered as ``harness``.
"""

from lora.megatron import LoRA, LoRAMerge, VLMLoRA  # noqa: F401
