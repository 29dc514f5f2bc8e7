"""LoRA implementations: `lora.reference` (single device) and `lora.megatron` (tensor/expert parallel).

Both expose `LoRA`, `VLMLoRA` and `LoRAMerge` with the fields of the SPEC and
share matching, init, config and freezing code through `lora._common`.
"""
