"""Bug (Megatron-Bridge #5379's class: a reshard that keeps one EP rank's values of a shared expert adapter): a
grouped linear's shared adapter keeps one copy per EP rank (its gradient is not summed over EP, as Megatron-
Bridge's shared adapters are per EP rank), and the checkpoint, which holds the adapter once, keeps EP rank 0's
copy (the others are its replicas). Loaded at any layout every expert gets rank 0's adapter, and the model
computes other logits than the one that was trained and saved."""

from tests.wrong_impls._experts import LORA_HARNESS_CAPABILITIES, LoRAMerge, VLMLoRA, patched_expert_lora  # noqa: F401
from tests.wrong_impls.shared_expert_grad_not_summed import _patch

LoRA = patched_expert_lora(_patch)
