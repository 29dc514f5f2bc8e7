"""Bug: applying the LoRA a second time re-initialises every existing adapter (not idempotent)."""

from dataclasses import dataclass

from lora.megatron import LoRA as _CorrectLoRA
from lora.megatron import LoRAMerge, VLMLoRA  # noqa: F401
from lora.megatron.dense_adapters import ParallelLoRALinear


@dataclass
class LoRA(_CorrectLoRA):
    def __call__(self, model, training=True):
        model = super().__call__(model, training=training)
        for module in model.modules():
            if isinstance(module, ParallelLoRALinear):
                module.adapter.reset_parameters("normal", "normal")
        return model
