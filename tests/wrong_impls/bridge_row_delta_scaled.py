"""Bug planted on top of Megatron-Bridge's own LoRA: a row-parallel adapter's delta is scaled on TP rank 1.

Bridge's classes, imported on CPU by ``harness.bridge``; its ``LoRA`` is
subclassed only to wrap the adapter forward of row-parallel bases
(``linear_proj``, ``linear_fc2``), which returns the full delta on every TP
rank, so that TP rank 1 adds 1.5 times it. Under the bridge contract this
must be a numeric verdict, never advisory.
"""

from dataclasses import dataclass

from harness.bridge import bridge_impl_module

_bridge = bridge_impl_module()
LORA_HARNESS_CAPABILITIES = dict(_bridge.LORA_HARNESS_CAPABILITIES)
VLMLoRA = _bridge.VLMLoRA
LoRAMerge = _bridge.LoRAMerge


@dataclass
class LoRA(_bridge.LoRA):
    def transform(self, module, name=None, prefix=None):
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel import RowParallelLinear

        new = super().transform(module, name, prefix)
        if new is not module and isinstance(getattr(new, "to_wrap", None), RowParallelLinear):
            adapter = new.adapter
            forward = adapter.forward

            def scaled(x, *args, **kwargs):
                out = forward(x, *args, **kwargs)
                return out * 1.5 if parallel_state.get_tensor_model_parallel_rank() == 1 else out

            adapter.forward = scaled
        return new
