"""Tensor-parallel LoRA on megatron-core layers: ``LoRA``, ``VLMLoRA``, ``LoRAMerge``."""

from lora.megatron.lora import LoRA, LoRAMerge, VLMLoRA, merge_lora

__all__ = ["LoRA", "VLMLoRA", "LoRAMerge", "merge_lora"]
