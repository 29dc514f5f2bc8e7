"""Bug: no check that TP divides the rank; megatron's own assertion fires deep inside instead of a named ValueError."""

from dataclasses import dataclass

from lora.megatron import LoRA as _CorrectLoRA
from lora.megatron import LoRAMerge, VLMLoRA  # noqa: F401
from lora.megatron.adapters import ParallelLoRALinear, ParallelLinearAdapter


@dataclass
class LoRA(_CorrectLoRA):
    def _wrap_parallel(self, module, full_name, kind):
        dim = self.adapter_rank(module, full_name)
        adapter = ParallelLinearAdapter(
            kind=kind, in_features=module.input_size, out_features=module.output_size, dim=dim,
            alpha=self.alpha, dropout=self.dropout, dropout_position=self.dropout_position,
            lora_dtype=self.lora_dtype or module.weight.dtype, base_config=module.config,
            tp_group=module.tp_group, is_expert=False, gated=False, module_name=full_name,
        )
        adapter.reset_parameters(self.lora_A_init_method, self.lora_B_init_method)
        return ParallelLoRALinear(module, adapter)
