"""Bug: nothing makes a recomputed block's input require grad (Megatron-Bridge #1750): under megatron's reentrant
checkpoint with a frozen base, the adapters inside get no gradient, or the loss has no grad_fn."""

from dataclasses import dataclass
from unittest import mock

import lora.megatron.walk as _walk
from lora.megatron import LoRA as _CorrectLoRA
from lora.megatron import LoRAMerge, VLMLoRA  # noqa: F401


@dataclass
class LoRA(_CorrectLoRA):
    def __call__(self, model, training=True):
        with mock.patch.object(_walk, "enable_recompute_input_grad", lambda chunks: 0):
            return super().__call__(model, training=training)
