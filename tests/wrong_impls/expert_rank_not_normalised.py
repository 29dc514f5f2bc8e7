"""Bug: normalize_moe_lora is accepted but ignored: expert adapters keep rank dim instead of dim // topk."""

from dataclasses import dataclass
from typing import Any

from lora.megatron import LoRA as _CorrectLoRA
from lora.megatron import LoRAMerge, VLMLoRA  # noqa: F401

LORA_HARNESS_CAPABILITIES = {"contract": "strict", "experts": True}


@dataclass
class LoRA(_CorrectLoRA):
    def adapter_rank(self, module: Any, full_name: str) -> int:
        return self.dim
