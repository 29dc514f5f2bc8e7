"""Bug: routed-expert adapters left flagged for ordinary data parallelism (``allreduce = True``, as a dense
parameter): megatron-core's DDP reduces their gradients over the dense data-parallel group instead of the
expert-data-parallel group. Where ETP != TP the two differ (Megatron-Bridge #5231: grouped-expert adapters at
EP=1, TP=2, ETP=1), so the expert replicas train on part of the tokens each and drift apart."""

from dataclasses import dataclass

from lora.megatron import LoRA as _CorrectLoRA
from lora.megatron import LoRAMerge, VLMLoRA  # noqa: F401


@dataclass
class LoRA(_CorrectLoRA):
    def __call__(self, model, training=True):
        model = super().__call__(model, training=training)
        for root in model if isinstance(model, list) else [model]:
            for name, p in root.named_parameters():
                if ".experts." in name and ".adapter" in name:
                    p.allreduce = True
        return model
