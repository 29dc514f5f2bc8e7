"""The reference's config: every LoRA field of the SPEC, with its default and its validation.

`LoRAFields` is the dataclass `LoRA` (and so `VLMLoRA`) inherits its fields
from; validation runs in `__post_init__`, with the SPEC's error messages.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from lora import _spec


def _as_dtype(value: Any) -> Optional[torch.dtype]:
    if value is None:
        return None
    dtype = value
    if isinstance(value, str):
        name = value[len("torch."):] if value.startswith("torch.") else value
        dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(
            f"lora_dtype={value!r} is invalid: it must be None (use the base weight's dtype) "
            "or a floating torch.dtype such as torch.bfloat16 (or its name, 'bfloat16')"
        )
    return dtype


def _as_pattern_list(field_name: str, value: Any) -> list[str]:
    if isinstance(value, str) or not isinstance(value, (list, tuple, set, frozenset)):
        raise ValueError(
            f"{field_name}={value!r} is invalid: it must be a list of names or patterns, e.g. {field_name}=[{value!r}]"
        )
    result = []
    for item in value:
        if not isinstance(item, str) or item == "":
            raise ValueError(f"{field_name} contains {item!r}; every entry must be a non-empty string")
        result.append(item)
    return result


@dataclass
class LoRAFields:
    """The SPEC's LoRA fields with their defaults; `__post_init__` validates them (and turns lora_dtype into a torch.dtype)."""

    target_modules: list[str] = field(default_factory=lambda: list(_spec.DEFAULT_TARGET_MODULES))
    exclude_modules: list[str] = field(default_factory=list)
    dim: int = 32
    alpha: float = 32
    dropout: float = 0.0
    dropout_position: str = "pre"
    a2a_experimental: bool = False
    lora_A_init_method: str = "xavier"
    lora_B_init_method: str = "zero"
    lora_dtype: Optional[torch.dtype] = None
    normalize_moe_lora: bool = False
    share_expert_adapters: bool = True

    # ------------------------------------------------------------ validation
    def __post_init__(self) -> None:
        self.target_modules = _as_pattern_list("target_modules", self.target_modules)
        self.exclude_modules = _as_pattern_list("exclude_modules", self.exclude_modules)
        if self.target_modules and self.exclude_modules:
            raise ValueError(
                f"target_modules={self.target_modules!r} and exclude_modules={self.exclude_modules!r} are both "
                "non-empty; exclude mode needs target_modules empty: pass target_modules=[] together with "
                "exclude_modules (the default target_modules list is non-empty)"
            )
        if type(self.dim) is not int or self.dim < 1:
            raise ValueError(f"dim={self.dim!r} is invalid: the adapter rank must be an int >= 1")
        if type(self.alpha) not in (int, float) or not math.isfinite(self.alpha):
            raise ValueError(f"alpha={self.alpha!r} is invalid: it must be a finite number")
        if type(self.dropout) not in (int, float) or not (0.0 <= self.dropout < 1.0):
            raise ValueError(f"dropout={self.dropout!r} is invalid: it must be a number in [0, 1)")
        if self.dropout_position not in _spec.DROPOUT_POSITIONS:
            raise ValueError(f"dropout_position={self.dropout_position!r} is invalid: it must be 'pre' or 'post'")
        for name in ("lora_A_init_method", "lora_B_init_method"):
            value = getattr(self, name)
            if value not in _spec.INIT_METHODS:
                raise ValueError(f"unknown {name} {value!r}; valid names are: {', '.join(_spec.INIT_METHODS)}")
        self.lora_dtype = _as_dtype(self.lora_dtype)
        for name in ("a2a_experimental", "normalize_moe_lora", "share_expert_adapters"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: it must be True or False")
