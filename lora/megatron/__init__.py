"""Tensor-parallel LoRA on megatron-core layers: ``LoRA``, ``VLMLoRA``, ``LoRAMerge`` (the package's public API).

One module per job: ``config`` (fields, validation, per-module rank),
``matching`` (which modules get an adapter), ``init`` (the layout-independent
draws), ``walk`` (the walk and ``LoRABase``), ``freeze`` (what is frozen),
``layout`` (groups, column/row, row shards), ``wrapper`` (the wrapper base
class), ``dense_adapters`` (TP adapters, plain nn.Linear), ``expert_adapters``
(routed experts), ``merge`` (all merging), ``recompute`` (adapter gradients
under activation recompute), ``lora`` (``LoRA``/``VLMLoRA``: which adapter a
module gets).
"""

from lora.megatron.lora import LoRA, VLMLoRA
from lora.megatron.merge import LoRAMerge, merge_lora

__all__ = ["LoRA", "VLMLoRA", "LoRAMerge", "merge_lora"]

# What the harness may draw for this implementation (plain data: lora-harness
# reads it without this package importing the harness). Routed experts
# (SequentialMLP and grouped linears, EP and ETP) are supported:
# lora.megatron.expert_adapters.
LORA_HARNESS_CAPABILITIES = {"contract": "strict", "experts": True}
