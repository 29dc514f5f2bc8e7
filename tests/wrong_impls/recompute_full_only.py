"""Bug: the recompute fix applies only when ``recompute_method`` is set (``full`` recompute), as Megatron-Bridge
0.6.2's does: under ``selective`` recompute of the MLP (or MoE layer), a layer whose only adapters are in that
region gets no gradient when nothing upstream of it trains."""

from dataclasses import dataclass
from unittest import mock

import lora.megatron.walk as _walk
from lora.megatron import LoRA as _CorrectLoRA
from lora.megatron import LoRAMerge, VLMLoRA  # noqa: F401
from lora.megatron.recompute import enable_recompute_input_grad


def _full_only(chunks):
    if any(getattr(getattr(c, "config", None), "recompute_method", None) is None for c in chunks):
        return 0
    return enable_recompute_input_grad(chunks)


@dataclass
class LoRA(_CorrectLoRA):
    def __call__(self, model, training=True):
        with mock.patch.object(_walk, "enable_recompute_input_grad", _full_only):
            return super().__call__(model, training=training)
