"""Bug: a TP-sharded dense adapter's dropout forks megatron's model-parallel RNG stream even inside a
TransformerBlock that already runs under that fork (sequence parallelism). In forward a nested fork
continues the stream; under activation recompute megatron's checkpoint restores the RNG states but not
the tracker's current stream, so the nested fork rewinds torch's default stream on exit and the expert
adapters' dropout after it draws other masks than its forward did: the gradients are those of another
mask (lora.megatron before the fix; the first deep run of recompute_transparent found it)."""

from dataclasses import dataclass
from unittest import mock

import lora.megatron.lora as _lora
from lora.megatron import LoRA as _CorrectLoRA
from lora.megatron import LoRAMerge, VLMLoRA  # noqa: F401


@dataclass
class LoRA(_CorrectLoRA):
    def __call__(self, model, training=True):
        with mock.patch.object(_lora, "_forks_model_parallel_rng", lambda module: False):
            return super().__call__(model, training=training)
