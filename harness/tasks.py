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


# Modules of the harness's GPT that are not linear-type, with the full name
# and class a pre-order walk meets first when a pattern selects them.
NON_LINEAR_TARGETS = (
    ("input_layernorm", "decoder.layers.0.input_layernorm"),
    ("self_attention", "decoder.layers.0.self_attention"),
    ("mlp", "decoder.layers.0.mlp"),
    ("*.layers.0.self_attention.core_attention", "decoder.layers.0.self_attention.core_attention"),
)


def run_error_case(ctx: Any, case: GPTCase) -> dict[str, Any]:
    """Bad input must give SPEC's errors and warnings, naming the module, the value and the rule.

    Variants are picked from the case's seed so hypothesis can vary and
    shrink them. Returns this rank's violations.
    """
    import warnings

    from megatron.core import parallel_state

    from harness.layouts import ParallelLayout
    from lora._common import INIT_METHODS

    layout = ParallelLayout.parse(case.layout)
    layout.initialize_megatron(ctx.world_size, seed=case.seed)
    impl = load_impl(case.impl)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    model_dtype = _dtype(case.model_dtype)
    violations: list[str] = []

    def fresh_model() -> torch.nn.Module:
        return build_gpt(case.shape, tp=tp, sequence_parallel=layout.sp, params_dtype=model_dtype)

    def expect(what: str, exc_type: type, fragments: list[str], make: Any) -> None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                make()
        except exc_type as exc:
            missing = [f for f in fragments if f not in str(exc)]
            if missing:
                violations.append(f"{what}: {exc_type.__name__}({str(exc)!r}) does not name {missing}")
            return
        except Exception as exc:  # noqa: BLE001 - the wrong kind of error is the finding
            violations.append(f"{what}: raised {type(exc).__name__}({exc}) instead of {exc_type.__name__}")
            return
        violations.append(f"{what}: no {exc_type.__name__} raised")

    expect(
        "target_modules and exclude_modules both non-empty",
        ValueError,
        ["target_modules=[]"],
        lambda: impl.LoRA(target_modules=["linear_qkv"], exclude_modules=["linear_proj"])(fresh_model()),
    )
    bogus = f"no_such_init_{case.seed % 97}"
    expect(
        f"lora_A_init_method={bogus!r}",
        ValueError,
        [bogus, *INIT_METHODS],
        lambda: impl.LoRA(lora_A_init_method=bogus)(fresh_model()),
    )
    pattern, full_name = NON_LINEAR_TARGETS[case.seed % len(NON_LINEAR_TARGETS)]
    expect(
        f"target_modules=[{pattern!r}] selecting a module with no adapter",
        TypeError,
        [full_name],
        lambda: impl.LoRA(target_modules=[pattern])(fresh_model()),
    )
    if tp > 1:
        dim = tp * (1 + case.seed % 3) + 1
        qkv = "decoder.layers.0.self_attention.linear_qkv"
        expect(
            f"dim={dim} at TP={tp} on a column-parallel base",
            ValueError,
            [qkv, str(dim), str(tp)],
            lambda: impl.LoRA(target_modules=["linear_qkv"], dim=dim)(fresh_model()),
        )
    unmatched = f"no_such_module_{case.seed % 89}"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            impl.LoRA(target_modules=["linear_qkv", unmatched], dim=tp)(fresh_model())
        except Exception as exc:  # noqa: BLE001
            violations.append(f"a pattern matching nothing raised {type(exc).__name__}({exc}) instead of warning")
    if not any(unmatched in str(w.message) for w in caught):
        violations.append(f"target pattern {unmatched!r} matched nothing and no warning named it")
    return {"rank": ctx.rank, "tp_rank": parallel_state.get_tensor_model_parallel_rank(), "error_violations": violations}
