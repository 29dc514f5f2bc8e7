"""What a rank executes for one example: build, shard, adapt, run, report.

A task runs on every rank of a pool (see ``harness.runner``). It only
executes: the example was drawn in the parent, and the comparison is made in
the parent. Everything a rank returns is plain tensors and dicts, keyed by
canonical full names so the parent can put shards back together.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from harness.models import GPTShape, build_gpt, causal_mask
from harness.sharding import SpecViolation, load_full_adapter_weights, load_full_base_weights, seeded_tensor

__all__ = ["GPTCase", "run_gpt_case", "load_impl"]

REQUIRED_NAMES = ("LoRA", "VLMLoRA", "LoRAMerge")


def load_impl(module_name: str) -> Any:
    """Import an implementation under test and check it exposes the SPEC names."""
    module = importlib.import_module(module_name)
    missing = [n for n in REQUIRED_NAMES if not hasattr(module, n)]
    if missing:
        raise TypeError(f"--lora-impl {module_name}: module does not expose {', '.join(missing)} (SPEC.md API)")
    return module


@dataclass(frozen=True)
class GPTCase:
    """One drawn example: model shape, LoRA config, seed, layout, implementation."""

    shape: GPTShape
    lora: dict[str, Any]
    seed: int
    layout: str = "tp1-ep1-etp1-pp1"
    impl: str = "lora.megatron"
    training: bool = True

    def with_(self, **changes: Any) -> "GPTCase":
        from dataclasses import replace

        return replace(self, **changes)

    def reference_key(self) -> tuple:
        return (self.shape, tuple(sorted((k, repr(v)) for k, v in self.lora.items())), self.seed, self.training)


def _dtype(value: Any) -> Optional[torch.dtype]:
    if value is None or isinstance(value, torch.dtype):
        return value
    return getattr(torch, str(value).replace("torch.", ""))


def run_gpt_case(ctx: Any, case: GPTCase) -> dict[str, Any]:
    """Forward and backward of a LoRA-adapted GPTModel at the case's layout."""
    from megatron.core import parallel_state

    from harness.layouts import ParallelLayout

    layout = ParallelLayout.parse(case.layout)
    layout.initialize_megatron(ctx.world_size, seed=case.seed)
    impl = load_impl(case.impl)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()

    model = build_gpt(case.shape, tp=tp, sequence_parallel=layout.sp)
    load_full_base_weights(model, case.seed, tp_rank, tp)
    lora_kwargs = dict(case.lora)
    lora_kwargs["lora_dtype"] = _dtype(lora_kwargs.get("lora_dtype"))
    torch.manual_seed(case.seed)
    model = impl.LoRA(**lora_kwargs)(model, training=case.training)
    adapter_layout = load_full_adapter_weights(model, case.seed, tp_rank, tp, lora_kwargs.get("dim", 32))

    frozen_violations = []
    for name, param in model.named_parameters():
        is_adapter = name in adapter_layout
        if param.requires_grad != is_adapter:
            frozen_violations.append(f"{name}: requires_grad={param.requires_grad}")

    s, b, h = case.shape.seq_length, case.shape.micro_batch_size, case.shape.hidden_size
    x = seeded_tensor(case.seed, "input", (s, b, h)).requires_grad_(True)
    ids = torch.zeros(b, s, dtype=torch.long)
    pos = torch.arange(s).unsqueeze(0).expand(b, s)
    out = model(ids, pos, causal_mask(s), decoder_input=x)
    # A random linear functional of the logits, so every output entry
    # reaches the gradients with a different weight.
    probe = seeded_tensor(case.seed, "probe", tuple(out.shape))
    (out.float() * probe).sum().backward()

    grads = {}
    for pname in adapter_layout:
        grad = model.get_parameter(pname).grad
        grads[pname] = None if grad is None else grad.detach().float().clone()
    return {
        "rank": ctx.rank,
        "tp_rank": tp_rank,
        "tp_size": tp,
        "output": out.detach().float().clone(),
        "input_grad": None if x.grad is None else x.grad.detach().clone(),
        "adapter_grads": grads,
        "adapter_layout": adapter_layout,
        "frozen_violations": frozen_violations,
    }
