"""LoRA implementations: `lora.reference` (single device) and `lora.megatron` (tensor/expert parallel).

Both expose `LoRA`, `VLMLoRA` and `LoRAMerge` with the fields of harness/SPEC.md. They
share no code, only the SPEC's constants in `lora._spec` (plain data):
`lora.reference` is the oracle the harness checks `lora.megatron` against, so
the two must be able to disagree.
"""
