"""Tensor-parallel LoRA on megatron-core layers: ``LoRA``, ``VLMLoRA``, ``LoRAMerge``."""

from lora.megatron.lora import LoRA, LoRAMerge, VLMLoRA, merge_lora

__all__ = ["LoRA", "VLMLoRA", "LoRAMerge", "merge_lora"]

# What the harness may draw for this implementation (plain data: lora-harness
# reads it without this package importing the harness). Routed experts
# (SequentialMLP and grouped linears, EP and ETP) are supported:
# lora.megatron.experts.
LORA_HARNESS_CAPABILITIES = {"contract": "strict", "experts": True}
