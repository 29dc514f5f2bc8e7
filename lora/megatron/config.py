"""lora.megatron's config: every LoRA field of the SPEC with its default and validation, and the rank it gives a module.

``LoRAFields`` holds the fields (``LoRA`` and ``VLMLoRA`` inherit them);
``find_moe_router_topk`` and ``moe_adapter_rank`` turn ``dim`` into an
expert linear's rank under ``normalize_moe_lora`` (``dim // moe_router_topk``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn

from lora._spec import DEFAULT_TARGET_MODULES, DROPOUT_POSITIONS
from lora.megatron.init import check_init_method
from lora.megatron.matching import both_modes_error

__all__ = ["LoRAFields", "find_moe_router_topk", "moe_adapter_rank"]


def _normalise_dtype(value: object) -> torch.dtype | None:
    if value is None:
        return None
    dtype = value
    if isinstance(value, str):
        name = value.removeprefix("torch.")
        dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(
            f"lora_dtype={value!r} is invalid: it must be None (use the base weight's dtype) "
            "or a floating torch.dtype such as torch.bfloat16 (or its name, 'bfloat16')"
        )
    return dtype


def _check_patterns(field_name: str, value: object) -> list[str]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise ValueError(
            f"{field_name}={value!r} is invalid: it must be a list of names or patterns, "
            f"e.g. {field_name}=[{value!r}]"
        )
    patterns = list(value)
    for p in patterns:
        if not isinstance(p, str) or not p:
            raise ValueError(
                f"{field_name} contains {p!r}; every entry must be a non-empty string"
            )
    return patterns


@dataclass
class LoRAFields:
    """Every LoRA config field of the SPEC, with its default and validation."""

    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    exclude_modules: list[str] = field(default_factory=list)
    dim: int = 32
    alpha: float = 32
    dropout: float = 0.0
    dropout_position: str = "pre"
    a2a_experimental: bool = False
    lora_A_init_method: str = "xavier"
    lora_B_init_method: str = "zero"
    lora_dtype: torch.dtype | None = None
    normalize_moe_lora: bool = False
    share_expert_adapters: bool = True

    def __post_init__(self) -> None:
        self.target_modules = _check_patterns("target_modules", self.target_modules)
        self.exclude_modules = _check_patterns("exclude_modules", self.exclude_modules)
        if self.target_modules and self.exclude_modules:
            raise both_modes_error(self.target_modules, self.exclude_modules)
        if isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim < 1:
            raise ValueError(f"dim={self.dim!r} is invalid: the adapter rank must be an int >= 1")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha):
            raise ValueError(f"alpha={self.alpha!r} is invalid: it must be a finite number")
        if (
            isinstance(self.dropout, bool)
            or not isinstance(self.dropout, (int, float))
            or not 0.0 <= self.dropout < 1.0
        ):
            raise ValueError(f"dropout={self.dropout!r} is invalid: it must be a number in [0, 1)")
        if self.dropout_position not in DROPOUT_POSITIONS:
            raise ValueError(
                f"dropout_position={self.dropout_position!r} is invalid: it must be 'pre' or 'post'"
            )
        check_init_method(self.lora_A_init_method, "lora_A_init_method")
        check_init_method(self.lora_B_init_method, "lora_B_init_method")
        self.lora_dtype = _normalise_dtype(self.lora_dtype)
        for name in ("a2a_experimental", "normalize_moe_lora", "share_expert_adapters"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: it must be True or False")

    @property
    def scale(self) -> float:
        """alpha / dim, the factor on the adapter branch."""
        return self.alpha / self.dim


def find_moe_router_topk(*candidates: object) -> int | None:
    """moe_router_topk from the first candidate (module or model) whose `.config` exposes it.

    Models wrapped in `.module` chains (DDP, Float16Module) are unwrapped.
    """
    for obj in candidates:
        seen = 0
        while obj is not None and seen < 16:
            topk = getattr(getattr(obj, "config", None), "moe_router_topk", None)
            if isinstance(topk, int) and not isinstance(topk, bool) and topk >= 1:
                return topk
            obj = getattr(obj, "module", None) if isinstance(obj, nn.Module) else None
            seen += 1
    return None


def moe_adapter_rank(dim: int, topk: int | None, full_name: str) -> int:
    """The normalized expert rank dim // topk, or a ValueError saying why it cannot be used."""
    if topk is None:
        raise ValueError(
            f"normalize_moe_lora=True but no moe_router_topk was found for expert linear "
            f"{full_name} (looked at the module's and the model's .config)"
        )
    if dim % topk:
        raise ValueError(
            f"normalize_moe_lora=True needs dim divisible by moe_router_topk: dim={dim} is not "
            f"divisible by topk={topk} for {full_name}"
        )
    return dim // topk
