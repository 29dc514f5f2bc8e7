"""lora.megatron declaring the bridge contract: a correct implementation judged by Bridge's rules.

Not an imitation of Megatron-Bridge (the harness runs the real library,
``tests/bridge/test_bridge_golden.py``): it is lora.megatron, numerically
correct, offering only Bridge's four init methods and raising Bridge's
error types on two points (AssertionError when target and exclude patterns
are both set, NotImplementedError for an unknown init method), so the
tests of the bridge-contract machinery (numeric verdicts stay numeric,
SPEC's stricter points become advisory, ``benchmarks/false_alarms.py``)
have a known-correct implementation that declares it with a plain dict.
"""

from dataclasses import dataclass

from lora.megatron import LoRA as _LoRA
from lora.megatron import LoRAMerge, VLMLoRA  # noqa: F401

LORA_HARNESS_CAPABILITIES = {"contract": "bridge", "sequence_parallel": False, "a2a": False, "experts": False, "vlm": False}

_BRIDGE_INITS = ("xavier", "kaiming", "normal", "zero")


@dataclass
class LoRA(_LoRA):
    def __post_init__(self):
        assert not (self.target_modules and self.exclude_modules), "cannot set both target_modules and exclude_modules"
        for which in ("lora_A_init_method", "lora_B_init_method"):
            if getattr(self, which) not in _BRIDGE_INITS:
                raise NotImplementedError(f"{which}={getattr(self, which)} is not implemented")
        super().__post_init__()
