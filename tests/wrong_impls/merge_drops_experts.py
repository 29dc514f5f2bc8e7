"""Bug: the model-level merge unwraps expert adapters without folding their deltas in."""

from lora.megatron import LoRA, VLMLoRA  # noqa: F401
from lora.megatron import LoRAMerge as _CorrectMerge
from lora.megatron.expert_adapters import is_expert_wrapper

LORA_HARNESS_CAPABILITIES = {"contract": "strict", "experts": True}


class LoRAMerge(_CorrectMerge):
    def transform(self, module, name=None, prefix=None):
        if is_expert_wrapper(module):
            return module.to_wrap
        return super().transform(module, name, prefix)
