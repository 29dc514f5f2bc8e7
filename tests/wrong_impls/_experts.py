"""Scaffolding for wrong expert implementations: lora.megatron with one expert-adapter behaviour replaced.

Patches act on the wrapper instances one LoRA call creates (never on
module-level functions): rank processes are shared with correct runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from lora.megatron import LoRA as _CorrectLoRA
from lora.megatron import LoRAMerge, VLMLoRA  # noqa: F401 - re-exported as the module's API
from lora.megatron.expert_adapters import ExpertLoRALinear, GroupedLoRALinear

LORA_HARNESS_CAPABILITIES = {"contract": "strict", "experts": True}


def patched_expert_lora(patch: Callable[[Any, str], None]) -> type:
    """A LoRA class that calls ``patch(wrapper, full_name)`` on every expert wrapper it makes."""

    @dataclass
    class LoRA(_CorrectLoRA):
        def transform(self, module: Any, name: Any = None, prefix: Any = None) -> Any:
            new = super().transform(module, name, prefix)
            if new is not module and isinstance(new, (ExpertLoRALinear, GroupedLoRALinear)):
                patch(new, f"{prefix}.{name}" if prefix else name)
            return new

    return LoRA
