"""The two LoRAs: the reference (the oracle), lora.megatron, their merge API and the rule that they share no code."""
