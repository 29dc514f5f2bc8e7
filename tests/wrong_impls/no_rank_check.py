"""Bug: no check that TP divides the rank; megatron's own assertion fires deep inside instead of a named ValueError."""

from dataclasses import dataclass

from lora.megatron import LoRA as _CorrectLoRA
from lora.megatron import LoRAMerge, VLMLoRA  # noqa: F401
from lora.megatron.dense_adapters import ParallelLoRALinear, ParallelLinearAdapter
from lora.megatron.expert_adapters import is_sequential_expert_linear
from lora.megatron.layout import base_parallel_kind


@dataclass
class LoRA(_CorrectLoRA):
    def transform(self, module, name=None, prefix=None):
        # A dense parallel base the matcher selects is wrapped here, without
        # lora.megatron.dense_adapters.wrap_parallel's divisibility checks.
        full_name = f"{prefix}.{name}" if prefix else (name or "")
        kind = base_parallel_kind(module)
        if kind is None or is_sequential_expert_linear(module) or not self.matcher.matches(module, full_name):
            return super().transform(module, name, prefix)
        dim = self.adapter_rank(module, full_name)
        adapter = ParallelLinearAdapter(
            kind=kind, in_features=module.input_size, out_features=module.output_size, dim=dim,
            alpha=self.alpha, dropout=self.dropout, dropout_position=self.dropout_position,
            lora_dtype=self.lora_dtype or module.weight.dtype, base_config=module.config,
            tp_group=module.tp_group, is_expert=False, gated=False, module_name=full_name,
        )
        adapter.reset_parameters(self.lora_A_init_method, self.lora_B_init_method)
        return ParallelLoRALinear(module, adapter)
