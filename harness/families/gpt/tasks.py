"""Dense GPT tasks: build megatron-core's GPTModel at the case's layout, adapt it, run it, report.

``run_gpt_case`` returns a ``RankRecord`` (logits, input gradient, adapter
gradients and initial adapters, with the partition table used to put shards
back together, the per-rank contract findings, and the dense evidence,
``harness.evidence.DenseExtras``); ``run_error_case`` returns an
``ErrorRecord`` with one finding per bad-input rule broken.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Iterator

import torch

from harness import cpu
from harness.families.gpt.case import GPTCase
from harness.dropout import keyed_dropout
from harness.evidence import DenseExtras, DropoutStats
from harness.contract import INIT_METHODS, contract_point
from harness.families.gpt.model import build_gpt, build_stage, causal_mask, output_layer_gathers
from harness.results import Finding
from harness.evidence import ErrorRecord, Partitioned, RankRecord
from harness.tasks.common import (
    checked_table,
    cpu64,
    error_expecter,
    merge_evidence,
    reapply_findings,
    replicated_masks,
    sequence_gathered,
    setup,
    state_findings,
)
from harness.sharding import (
    initial_adapters,
    load_full_adapter_weights,
    load_full_base_weights,
    seeded_tensor,
)

__all__ = ["run_gpt_case", "run_error_case", "NON_LINEAR_TARGETS"]


def run_gpt_case(ctx: Any, case: GPTCase) -> RankRecord:
    """Forward and backward of a LoRA-adapted GPTModel at the case's layout (at pp > 1:
    ``harness.families.gpt.pipeline``)."""
    from megatron.core import parallel_state

    if case.layout.pp > 1:
        from harness.families.gpt.pipeline import run_gpt_pipeline_case

        return run_gpt_pipeline_case(ctx, case)

    impl, tp, tp_rank = setup(ctx, case)
    model = build_gpt(case.shape, tp=tp, sequence_parallel=case.layout.sp, params_dtype=case.model_dtype,
                      parallel_output=not output_layer_gathers(case.contract))
    load_full_base_weights(model, case.seed, tp_rank, tp)
    lora_kwargs = case.lora_kwargs()
    cpu.manual_seed(case.seed)
    model = impl.LoRA(**lora_kwargs)(model, training=case.training)
    initial = initial_adapters(model)
    table, broken = checked_table(
        lambda: load_full_adapter_weights(model, case.seed, tp_rank, tp, lora_kwargs.get("dim", 32)), ctx.rank, tp_rank, tp)
    if broken is not None:
        return broken
    partitions = {p: Partitioned(w, part.dim, part.gated, tuple(shape)) for p, (w, part, shape) in table.items()}
    findings = state_findings(model, table, case)
    model_grid, adapter_grid = _round_to_grid(model, table, case)

    # Seeded on the CPU, then moved: the same values on every device.
    device = getattr(ctx, "device", None) or torch.device("cpu")
    s, b, h = case.shape.seq_length, case.shape.micro_batch_size, case.shape.hidden_size
    ids = torch.zeros(b, s, dtype=torch.long, device=device)
    pos = torch.arange(s, device=device).unsqueeze(0).expand(b, s)
    first: dict[str, Any] = {}
    # Value-keyed dropout masks (harness.dropout): the same decisions here
    # and in the reference, so training-mode dropout compares exactly.
    with keyed_dropout(model) as dropout_log:
        for mb in range(case.micro_batches):
            suffix = "" if mb == 0 else str(mb)
            full_x = _grid(seeded_tensor(case.seed, "input" + suffix, (s, b, h)), model_grid).to(device=device, dtype=case.model_dtype)
            # Under sequence parallelism megatron expects this rank's sequence
            # shard as decoder_input, and its gradient is that shard's.
            x = (full_x.chunk(tp, dim=0)[tp_rank] if case.layout.sp else full_x).clone().requires_grad_(True)
            with _counting_all_to_all() as all_to_all_calls:
                out = model(ids, pos, causal_mask(s).to(device), decoder_input=x)
            if mb == 0:
                findings += _a2a_findings(case, table, tp, all_to_all_calls[0])
            # A random linear functional of the logits, so every output entry
            # reaches the gradients with a different weight.
            probe = _grid(seeded_tensor(case.seed, "probe" + suffix, tuple(out.shape)), model_grid).to(device=device, dtype=out.dtype)
            # Gradients of every micro-batch must add up in .grad.
            (out * probe).sum().backward()
            if mb == 0:
                first = {"out": out, "x": x}
    out, x = first["out"], first["x"]
    if out.dtype != case.model_dtype:
        findings.append(Finding(
            "contract", f"logits dtype {out.dtype}, the base model computes in {case.model_dtype} "
            "(the adapter output must be cast back)", "output_dtype"))
    grads = {p: cpu64(model.get_parameter(p).grad) for p in table}
    dropout = DropoutStats.of(dropout_log)
    stepped = _sgd_step(model, table) if case.training else None
    forward = lambda m: m(ids, pos, causal_mask(s).to(device), decoder_input=x.detach())  # noqa: E731
    masks = None
    if case.training and case.lora.get("dropout", 0.0) > 0 and tp > 1:
        masks = replicated_masks(model, forward, s // tp if case.layout.sp else None)
    # Idempotence after the comparisons above, and undone before the merge
    # below (``reapply_findings`` restores the module tree): a
    # non-idempotent implementation fails this check alone.
    findings += reapply_findings(model, impl, lora_kwargs, case.training, case.contract)
    merge = merge_evidence(model, impl, table, lora_kwargs.get("alpha", 32), forward)
    return RankRecord(
        rank=ctx.rank,
        tp_rank=tp_rank,
        tp_size=tp,
        dp_rank=parallel_state.get_data_parallel_rank(),
        output=cpu64(out),
        input_grad=cpu64(sequence_gathered(x.grad) if case.layout.sp else x.grad),
        adapter_grads=grads,
        initial_adapters=initial,
        partitions=partitions,
        findings=findings,
        extras=DenseExtras(dropout=dropout, merge=merge, stepped_adapters=stepped, dropout_masks=masks),
    )


@contextlib.contextmanager
def _counting_all_to_all() -> Iterator[list[int]]:
    """Counts ``torch.distributed.all_to_all_single`` / ``all_to_all`` calls inside the block."""
    import torch.distributed as dist

    calls = [0]
    real_single, real_list = dist.all_to_all_single, dist.all_to_all

    def single(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return real_single(*args, **kwargs)

    def listed(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return real_list(*args, **kwargs)

    dist.all_to_all_single, dist.all_to_all = single, listed
    try:
        yield calls
    finally:
        dist.all_to_all_single, dist.all_to_all = real_single, real_list


def _a2a_findings(case: GPTCase, table: dict[str, Any], tp: int, calls: int) -> list[Finding]:
    """SPEC: with a2a_experimental under sequence parallelism, each row-parallel adapter turns
    (s, b, out/t) into (s/t, b, out) with one all-to-all, instead of a gather and a scatter.
    The numbers are the same either way, so only the count of all-to-alls in one forward shows
    whether the flag was honoured (the dense model has no other all-to-all)."""
    if not (case.layout.sp and tp > 1 and case.lora.get("a2a_experimental")):
        return []
    rows = sorted({w for p, (w, part, _) in table.items() if p.endswith(".adapter.linear_in.weight") and part.dim == 1})
    if not rows or calls == len(rows):
        return []
    return [Finding(
        "contract", f"a2a_experimental=True under sequence parallelism: {calls} all-to-all call(s) in one forward for "
        f"{len(rows)} row-parallel adapter(s) {rows[:3]}; SPEC: one all-to-all per row-parallel adapter "
        "(sequence <-> hidden) instead of gather and scatter", "a2a_all_to_all")]


def _grid(t: torch.Tensor, grid: Any) -> torch.Tensor:
    """``t`` rounded to ``grid``'s values (a dtype, or None: unchanged), in its own dtype."""
    return t if grid is None else t.to(grid).to(t.dtype)


def _round_to_grid(model: torch.nn.Module, table: dict[str, Any], case: GPTCase) -> tuple[Any, Any]:
    """Round every parameter to the case's value grid (adapters to the adapter grid), in place.

    A float64 run on a 16-bit run's exact weights (``GPTCase.value_grid``):
    the low-precision runs cast the same seeded values to their dtypes,
    which is the same rounding elementwise, shards or not.
    """
    if case.value_grid is None:
        return None, None
    from harness.cases import parse_dtype

    model_grid, adapter_grid = (parse_dtype(n) for n in case.value_grid)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(_grid(param, adapter_grid if name in table else model_grid))
    return model_grid, adapter_grid


#: Learning rate of the one optimizer step whose result is compared.
STEP_LR = 0.1


def _sgd_step(model: torch.nn.Module, table: dict[str, Any]) -> dict[str, Any]:
    """One ``torch.optim.SGD`` step over the trainable parameters; the adapters after it."""
    trainable = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
    if trainable:
        torch.optim.SGD(trainable, lr=STEP_LR).step()
    return {p: cpu64(model.get_parameter(p)) for p in table}


# Modules of the harness's GPT that are not linear-type, with the full name
# a pre-order walk meets first when a pattern selects them.
NON_LINEAR_TARGETS = (
    ("input_layernorm", "decoder.layers.0.input_layernorm"),
    ("self_attention", "decoder.layers.0.self_attention"),
    ("mlp", "decoder.layers.0.mlp"),
    ("*.layers.0.self_attention.core_attention", "decoder.layers.0.self_attention.core_attention"),
)


def run_error_case(ctx: Any, case: GPTCase) -> ErrorRecord:
    """Bad input must give the contract's errors and warnings, naming the module, the value and the rule.

    Under the ``bridge`` contract, Megatron-Bridge's error types are accepted
    and a miss of SPEC's stricter form is an advisory finding. Variants are
    picked from the case's seed so hypothesis can vary and shrink them.
    """
    from megatron.core import parallel_state

    from harness.pipeline import global_view, handed_over

    impl, tp, tp_rank = setup(ctx, case)
    findings: list[Finding] = []
    layout = case.layout

    def fresh_model() -> Any:
        """The model as megatron hands it over: at a pipeline layout this rank's stage (a list of chunks under
        virtual stages)."""
        chunks = build_stage(case, tp)
        return handed_over(chunks, layout)

    # The errors name modules by the whole model's names: on a pipeline stage the first module a pattern
    # selects is in the stage's first layer (global number ``first``), and a pattern naming layer 0 selects
    # nothing on the other stages, so the layer-indexed one is not used there.
    sample = fresh_model()
    view = global_view(sample if isinstance(sample, list) else [sample])
    first = min(int(k) for k in view.get_submodule("decoder.layers")._modules) if layout.pp > 1 else 0

    expect = error_expecter(case.contract, findings)

    both = contract_point("both_modes")
    expect(
        "both_modes", "target_modules and exclude_modules both non-empty", both.strict_errors, both.bridge_errors,
        ["target_modules=[]"],
        lambda: impl.LoRA(target_modules=["linear_qkv"], exclude_modules=["linear_proj"])(fresh_model()),
    )
    unknown = contract_point("unknown_init")
    bogus = f"no_such_init_{case.seed % 97}"
    for which in ("lora_A_init_method", "lora_B_init_method"):
        expect(
            "unknown_init", f"{which}={bogus!r}", unknown.strict_errors, unknown.bridge_errors,
            [bogus, *INIT_METHODS] if case.contract == "strict" else [bogus],
            lambda which=which: impl.LoRA(**{which: bogus})(fresh_model()),
        )
    non_linear = contract_point("non_linear_target")
    targets = NON_LINEAR_TARGETS if layout.pp == 1 else [t for t in NON_LINEAR_TARGETS if ".layers.0." not in t[0]]
    pattern, full_name = targets[case.seed % len(targets)]
    full_name = full_name.replace("decoder.layers.0.", f"decoder.layers.{first}.")
    type_name = type(view.get_submodule(full_name)).__name__
    expect(
        "non_linear_target", f"target_modules=[{pattern!r}] selecting a module with no adapter",
        non_linear.strict_errors, non_linear.bridge_errors, [full_name, type_name],
        lambda: impl.LoRA(target_modules=[pattern])(fresh_model()),
    )
    if tp > 1:
        dim = tp * (1 + case.seed % 3) + 1
        qkv = f"decoder.layers.{first}.self_attention.linear_qkv"
        expect(
            "rank_divisible", f"dim={dim} at TP={tp} on a column-parallel base", ("ValueError",), ("AssertionError", "ValueError"),
            [qkv, str(dim), str(tp)],
            lambda: impl.LoRA(target_modules=["linear_qkv"], dim=dim)(fresh_model()),
        )
    for mode in ("target", "exclude"):
        unmatched = f"no_such_module_{case.seed % 89}"
        kwargs = (
            dict(target_modules=["linear_qkv", unmatched], dim=tp)
            if mode == "target"
            else dict(target_modules=[], exclude_modules=["output_layer", unmatched], dim=tp)
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                impl.LoRA(**kwargs)(fresh_model())
            except Exception as exc:  # noqa: BLE001
                findings.append(Finding("contract", f"a {mode} pattern matching nothing raised {type(exc).__name__}({exc}) instead of warning", "unmatched_warns"))
                continue
        if not any(unmatched in str(w.message) for w in caught):
            # Megatron-Bridge 0.6.2 is silent (contract point unmatched_warns): advisory under bridge.
            findings.append(Finding("contract", f"{mode} pattern {unmatched!r} matched nothing and no warning named it",
                                    "unmatched_warns", binding=case.contract == "strict"))
    return ErrorRecord(rank=ctx.rank, tp_rank=parallel_state.get_tensor_model_parallel_rank(), findings=findings)
