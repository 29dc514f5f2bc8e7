"""Shared scaffolding: lora.megatron with one adapter behaviour replaced after wrapping."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from lora.megatron import LoRAMerge, VLMLoRA  # noqa: F401 - re-exported as the module's API
from lora.megatron import LoRA as _CorrectLoRA
from lora.megatron.dense_adapters import ParallelLoRALinear


def patched_lora(patch: Callable[[ParallelLoRALinear, str], None], *, after_init: bool = False) -> type:
    """A LoRA class that calls ``patch(wrapper, full_name)`` on every parallel wrapper it makes.

    With ``after_init`` the adapter is initialised again after the patch, so a
    patched ``reset_parameters`` takes effect.
    """

    @dataclass
    class LoRA(_CorrectLoRA):
        def transform(self, module: Any, name: Any = None, prefix: Any = None) -> Any:
            new = super().transform(module, name, prefix)
            if new is not module and isinstance(new, ParallelLoRALinear):
                full = f"{prefix}.{name}" if prefix else name
                patch(new, full)
                if after_init:
                    new.adapter.reset_parameters(self.lora_A_init_method, self.lora_B_init_method)
            return new

    return LoRA
