"""Bug: under megatron's shared-expert overlap (``moe_shared_expert_overlap``: the shared expert's linears
leave their TP communication to the MoE layer, ``explicit_expert_comm``) the shared expert's fc2 adapter
adds its whole, already reduced delta on every TP rank; the layer's reduction after fc2 then sums it TP
times (Megatron-Bridge #6089)."""

from dataclasses import dataclass
from unittest import mock

import lora.megatron.dense_adapters as _dense
from lora.megatron import LoRA as _CorrectLoRA
from lora.megatron import LoRAMerge, VLMLoRA  # noqa: F401


class _Whole:
    @staticmethod
    def apply(x, t):
        return x


@dataclass
class LoRA(_CorrectLoRA):
    def __call__(self, model, training=True):
        model = super().__call__(model, training=training)
        # The share is taken in forward, so the patch lives as long as the module: bind it per adapter.
        for root in model if isinstance(model, list) else [model]:
            for module in root.modules():
                if isinstance(module, _dense.ParallelLinearAdapter) and module.explicit_comm:
                    module.forward = _forward_whole.__get__(module)
        return model


def _forward_whole(self, x):
    with mock.patch.object(_dense, "_ShareOfReplicated", _Whole):
        return _dense.ParallelLinearAdapter.forward(self, x)
