"""Bug: expert adapters are built on the dense tensor-parallel group instead of the expert-TP group.

Where ETP differs from TP (e.g. TP=2, ETP=1) the adapter is split over the
wrong ranks.
"""

from dataclasses import dataclass
from typing import Any

from lora.megatron import LoRA as _CorrectLoRA
from lora.megatron import LoRAMerge, VLMLoRA  # noqa: F401
from lora.megatron.expert_adapters import is_grouped_linear, is_sequential_expert_linear

LORA_HARNESS_CAPABILITIES = {"contract": "strict", "experts": True}


@dataclass
class LoRA(_CorrectLoRA):
    def transform(self, module: Any, name: Any = None, prefix: Any = None) -> Any:
        if not (is_grouped_linear(module) or is_sequential_expert_linear(module)):
            return super().transform(module, name, prefix)
        from megatron.core import parallel_state

        saved = {k: module.__dict__[k] for k in ("tp_group", "_tp_group") if k in module.__dict__}
        dense = parallel_state.get_tensor_model_parallel_group()
        for k in ("tp_group", "_tp_group"):
            if k in saved:
                module.__dict__[k] = dense
        try:
            return super().transform(module, name, prefix)
        finally:
            module.__dict__.update(saved)
