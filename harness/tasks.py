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
from harness.sharding import adapter_modules, load_full_adapter_weights, load_full_base_weights, seeded_tensor

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
    # The base model's dtype. The equivalence properties run the model in
    # float64 so that what they compare is the sharding, not float32
    # rounding amplified through attention and normalisation.
    model_dtype: str = "float32"

    def with_(self, **changes: Any) -> "GPTCase":
        from dataclasses import replace

        return replace(self, **changes)

    def reference_key(self) -> tuple:
        return (self.shape, tuple(sorted((k, repr(v)) for k, v in self.lora.items())), self.seed, self.training, self.model_dtype)


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

    model_dtype = _dtype(case.model_dtype)
    model = build_gpt(case.shape, tp=tp, sequence_parallel=layout.sp, params_dtype=model_dtype)
    load_full_base_weights(model, case.seed, tp_rank, tp)
    lora_kwargs = dict(case.lora)
    lora_kwargs["lora_dtype"] = _dtype(lora_kwargs.get("lora_dtype"))
    torch.manual_seed(case.seed)
    model = impl.LoRA(**lora_kwargs)(model, training=case.training)
    initial = {
        f"{wname}.adapter.{which}.weight": getattr(wrapper.adapter, which).weight.detach().double().cpu()
        for wname, wrapper in adapter_modules(model).items()
        for which in ("linear_in", "linear_out")
        if isinstance(getattr(getattr(wrapper.adapter, which, None), "weight", None), torch.Tensor)
    }
    adapter_layout = load_full_adapter_weights(model, case.seed, tp_rank, tp, lora_kwargs.get("dim", 32))
    violations = _spec_violations(model, adapter_layout, lora_kwargs["lora_dtype"])

    # Seeded on the CPU, then moved: the same values on every device.
    device = getattr(ctx, "device", None) or torch.device("cpu")
    s, b, h = case.shape.seq_length, case.shape.micro_batch_size, case.shape.hidden_size
    x = seeded_tensor(case.seed, "input", (s, b, h)).to(device=device, dtype=model_dtype).requires_grad_(True)
    ids = torch.zeros(b, s, dtype=torch.long, device=device)
    pos = torch.arange(s, device=device).unsqueeze(0).expand(b, s)
    out = model(ids, pos, causal_mask(s).to(device), decoder_input=x)
    # A random linear functional of the logits, so every output entry
    # reaches the gradients with a different weight.
    if out.dtype != model_dtype:
        violations.append(f"logits dtype {out.dtype}, base model computes in {model_dtype} (adapter output must be cast back)")
    probe = seeded_tensor(case.seed, "probe", tuple(out.shape)).to(device=device, dtype=out.dtype)
    (out * probe).sum().backward()

    grads = {}
    for pname in adapter_layout:
        grad = model.get_parameter(pname).grad
        grads[pname] = None if grad is None else grad.detach().double().cpu()
    # Last, so that a non-idempotent implementation fails this check alone
    # and the forward/backward comparisons above see its first application.
    violations += _reapply_violations(model, impl, lora_kwargs, case.training)
    return {
        "rank": ctx.rank,
        "tp_rank": tp_rank,
        "tp_size": tp,
        "output": out.detach().double().cpu(),
        "input_grad": None if x.grad is None else x.grad.detach().double().cpu(),
        "adapter_grads": grads,
        "adapter_layout": adapter_layout,
        "initial_adapters": initial,
        "spec_violations": violations,
    }


def _spec_violations(model: torch.nn.Module, adapter_layout: dict[str, Any], lora_dtype: Optional[torch.dtype]) -> list[str]:
    """Trainable set and adapter dtypes per SPEC.md."""
    found = []
    for name, param in model.named_parameters():
        is_adapter = name in adapter_layout
        if param.requires_grad != is_adapter:
            kind = "adapter" if is_adapter else "base"
            found.append(f"{kind} parameter {name} has requires_grad={param.requires_grad}")
        if is_adapter:
            base = model.get_submodule(adapter_layout[name][0]).to_wrap
            expected = lora_dtype or base.weight.dtype
            if param.dtype != expected:
                found.append(f"adapter parameter {name} has dtype {param.dtype}, lora_dtype says {expected}")
    return found


def _reapply_violations(model: torch.nn.Module, impl: Any, lora_kwargs: dict[str, Any], training: bool) -> list[str]:
    """Applying the same LoRA again must change nothing (SPEC: idempotent)."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model = impl.LoRA(**lora_kwargs)(model, training=training)
    after = dict(model.named_parameters())
    found = []
    added, removed = sorted(set(after) - set(before)), sorted(set(before) - set(after))
    if added or removed:
        found.append(f"applying LoRA twice changed the parameters: added {added[:4]}, removed {removed[:4]}")
    for name in sorted(set(before) & set(after)):
        if not torch.equal(before[name], after[name].detach()):
            found.append(f"applying LoRA twice changed the values of {name}")
            break
    return found
