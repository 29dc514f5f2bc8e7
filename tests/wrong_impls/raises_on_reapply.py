"""Bug: applying the LoRA a second time raises instead of changing nothing (SPEC: idempotent).

Its first application is correct, so the numeric properties must still pass:
one finding (idempotence) must not hide the others' verdicts.
"""

from dataclasses import dataclass

from lora.megatron import LoRA as _CorrectLoRA
from lora.megatron import LoRAMerge, VLMLoRA  # noqa: F401


@dataclass
class LoRA(_CorrectLoRA):
    def __call__(self, model, training=True):
        if any(hasattr(m, "to_wrap") for m in model.modules()):
            raise RuntimeError("model is already adapted")
        return super().__call__(model, training=training)
