"""Single-device reference LoRA, written directly from harness/SPEC.md: the numbers every sharded implementation must reproduce.

This package is the harness's oracle. It shares no code with `lora.megatron`
(the implementation under test): it imports only torch, the standard library
and the SPEC's constants (`lora._spec`, plain data). Everything is written out
plainly: loops over `named_modules()`, explicit `x @ A.T` products. One
module per job: `config` (fields, validation), `matching` (which modules are
selected), `layers` (which base layers it can adapt, their shapes, their TP
size), `init` (the draws), `adapters` (adapter and wrapper modules), `walk`
(replacing modules in a model), `freeze` (what is frozen), `merge` (folding
adapters into base weights), `lora` (`LoRA`, `VLMLoRA`).

It adapts `torch.nn.Linear`, megatron-core `ColumnParallelLinear` /
`RowParallelLinear` whose TP group has size 1, and grouped expert linears
whose TP group has size 1 (a layer of a TP-sharded model is a `ValueError`:
use `lora.megatron`); any other selected module is a `TypeError`.

    y' = base(x) + (alpha / r) * Dpost(B(A(Dpre(x))))

The adapter computes in lora_dtype (or the base weight's dtype) and its result
is cast to the base output's dtype before the sum.

A grouped expert linear is recognised by its shape, not its class (TE's
`GroupedLinear`, megatron's `TEGroupedLinear`, `harness.families.moe.model.TorchGroupedLinear`
all qualify): an int `num_gemms` = n and its own 2-D parameters `weight0` ..
`weight{n-1}`, each (out, in), called as `forward(x, m_splits)` with the rows
of x grouped by expert and m_splits the tokens per expert. It counts as
linear-type in exclude mode. Its wrapper is a `LoRAGroupedLinear`:
- `share_expert_adapters=True`: one `LoRAAdapter` for the module, applied to
  every row of x whatever its expert; parameters `adapter.linear_in.weight`
  (r, in) and `adapter.linear_out.weight` (out, r), drawn A then B.
- `share_expert_adapters=False`: one adapter per expert, parameters
  `adapter.linear_in.weight{i}` (r, in) and `adapter.linear_out.weight{i}`
  (out, r); expert i's adapter acts on the rows m_splits gives expert i.
  Drawn A0, B0, A1, B1, ... over the full shapes.
Merging folds `scale * B_i @ A_i` (shared: the same B @ A) into `weight{i}`.

Fields the reference accepts but that have nothing to act on here:
- `a2a_experimental`: only changes communication under sequence parallelism;
  a no-op on one device.
- `share_expert_adapters`: honoured for grouped expert linears (above). A
  module holding one expert (SequentialMLP) gets its own adapter either way.
- `normalize_moe_lora`: honoured. A module whose full name lies under
  `...mlp.experts...` gets rank `dim // moe_router_topk`, topk read from the
  module's or the model's `.config`; missing topk or a dim not divisible by it
  is a `ValueError`. alpha is unchanged, so the scale is alpha / (dim // topk).
"""

from lora.reference.adapters import LoRAAdapter, LoRAExpertAdapters, LoRAGroupedLinear, LoRALinear
from lora.reference.lora import LoRA, VLMLoRA
from lora.reference.merge import LoRAMerge, merge_lora

__all__ = [
    "LoRA",
    "VLMLoRA",
    "LoRAMerge",
    "LoRALinear",
    "LoRAAdapter",
    "LoRAGroupedLinear",
    "LoRAExpertAdapters",
    "merge_lora",
]
