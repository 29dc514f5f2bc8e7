"""The dense forward/backward task at a pipeline layout (pp > 1): megatron-core's schedule over the stages.

What ``run_gpt_case`` does at PP=1, with the model built as megatron builds it for a pipeline (one
chunk per virtual stage on each rank, ``harness.pipeline``) and handed to the implementation as
megatron hands it over (a module per stage, a list of chunks under virtual stages). Weights and
adapters are loaded, and gradients read, through ``global_view``: by PP=1 names, so a stage's
local ``decoder.layers.0`` is loaded and compared as the global layer it is. The pipeline runs the
micro-batches through megatron-core's own schedule; the logits come from the last stage, the input
gradient from the first, the adapters from every stage, and every rank of a pipeline group sends
the whole model's evidence (``stage_gathered``), so the parent compares it as at PP=1.

Under virtual stages megatron's interleaved schedule takes a multiple of ``pp`` micro-batches; a case's
are padded to one with micro-batches whose loss is zero (exact zeros added to every gradient).

The merge evidence is made as at PP=1: every adapted module's ``LoRAMerge.merge`` against the
harness's own ``W + s B A`` (``module_merges`` on the global view, per stage), and the model folded
(``LoRAMerge()`` on what the implementation was handed, or the harness's fold with its ``merge``,
chunk by chunk) run forward-only through the schedule before and after, the logits from the last
stage sent to every rank of the pipeline group.

With dropout in training at TP > 1 the replicated-mask check runs the implementation's own dropout
through a forward-only schedule, each TP group inside its stage. Not made at pipeline layouts: the
all-to-all count of ``a2a_experimental`` (the pipeline layouts have no sequence parallelism).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from harness.dropout import keyed_dropout
from harness.evidence import DenseExtras, DropoutStats, MergeEvidence, ModelFold, Partitioned, RankRecord
from harness.families.gpt.case import GPTCase
from harness.families.gpt.model import causal_mask
from harness.families.gpt.tasks import _grid, _round_to_grid, _sgd_step
from harness.families.gpt.stage import adapted_stage
from harness.pipeline import (
    chunks_of,
    global_view,
    handed_over,
    merged,
    padded,
    run_schedule,
    stage_gathered,
    stage_input,
    stage_logits,
)
from harness.results import Finding
from harness.sharding import seeded_tensor
from harness.tasks.common import (
    any_rank,
    cpu64,
    reapply_findings,
    replicated_masks,
    sequence_gathered,
    setup,
    stage_local_findings,
    stage_record,
    state_findings,
)

__all__ = ["run_gpt_pipeline_case", "pipeline_merge_evidence"]



def run_gpt_pipeline_case(ctx: Any, case: GPTCase) -> RankRecord:
    """Forward and backward of a LoRA-adapted, pipelined GPTModel at the case's layout."""
    from megatron.core import parallel_state

    impl, tp, tp_rank = setup(ctx, case)
    layout = case.layout
    lora_kwargs = case.lora_kwargs()
    built = adapted_stage(ctx, case, impl, tp, tp_rank, training=case.training)
    if built.broken is not None:
        return built.broken
    chunks, view, initial, table = built.chunks, built.view, built.initial, built.table
    # state_findings reads the model's mode: the view's is every chunk's, or the wrong one if they differ.
    same_mode = all(c.training == case.training for c in chunks)
    view.training = case.training if same_mode else not case.training
    findings = state_findings(view, table, case) + stage_local_findings(chunks, view, lora_kwargs)
    grid = _round_to_grid(view, table, case)[0]

    s, b, h = case.shape.seq_length, case.shape.micro_batch_size, case.shape.hidden_size
    ids = torch.zeros(b, s, dtype=torch.long)
    pos = torch.arange(s).unsqueeze(0).expand(b, s)
    mask = causal_mask(s)
    batches = []
    for mb in range(case.micro_batches):
        suffix = "" if mb == 0 else str(mb)
        full_x = _grid(seeded_tensor(case.seed, "input" + suffix, (s, b, h)), grid).to(case.model_dtype)
        x = (full_x.chunk(tp, dim=0)[tp_rank] if layout.sp else full_x).clone().requires_grad_(True)
        probe = _grid(seeded_tensor(case.seed, "probe" + suffix, (b, s, case.shape.vocab_size)), grid)
        batches.append({"x": x, "probe": probe})
    batches = padded(batches, layout)

    forward = stage_input(ids, pos, mask)
    with keyed_dropout(chunks[0]) as dropout_log:
        outputs = run_schedule(chunks, batches, forward, lambda out, batch: (out * batch["probe"].to(out.dtype)).sum(),
                               seq_length=s, micro_batch_size=b)
    if outputs and outputs[0].dtype != case.model_dtype:
        findings.append(Finding(
            "contract", f"logits dtype {outputs[0].dtype}, the base model computes in {case.model_dtype} "
            "(the adapter output must be cast back)", "output_dtype"))
    first_stage = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
    x = batches[0]["x"]
    input_grad = (sequence_gathered(x.grad) if layout.sp else x.grad) if first_stage else None
    grads = {p: cpu64(view.get_parameter(p).grad) for p in table}
    stepped = _sgd_step(view, table) if case.training else None

    def logits(model_chunks: list[Any]) -> torch.Tensor:
        return stage_logits(model_chunks, forward, x.detach(), (b, s, case.shape.vocab_size), layout)

    masks = None
    if case.training and case.lora.get("dropout", 0.0) > 0 and tp > 1:
        # The implementation's own dropout, through the schedule: each TP group is inside one stage.
        masks = replicated_masks(view, lambda _: logits(chunks), s // tp if layout.sp else None)
    findings += reapply_findings(view, impl, lora_kwargs, case.training, case.contract,
                                 handed=handed_over(chunks, layout), names=lambda m: global_view(chunks_of(m)))
    merge = pipeline_merge_evidence(chunks, view, impl, table, lora_kwargs.get("alpha", 32), layout, logits)
    partitions = {p: Partitioned(w, part.dim, part.gated, tuple(shape)) for p, (w, part, shape) in table.items()}
    mine = {
        "output": cpu64(outputs[0]) if outputs else None,
        "input_grad": cpu64(input_grad),
        "grads": grads,
        "initial": initial,
        "partitions": partitions,
        "stepped": stepped,
    }
    stages = stage_gathered(mine)
    extras = DenseExtras(
        dropout=DropoutStats.of(dropout_log),
        merge=merge,
        stepped_adapters=merged([st["stepped"] for st in stages]),
        dropout_masks=masks,
    )
    return stage_record(ctx, tp_rank, tp, stages, findings, extras)


def pipeline_merge_evidence(chunks: list[Any], view: Any, impl: Any, table: Optional[dict[str, Any]], alpha: float,
                            layout: Any, logits: Any) -> MergeEvidence:
    """``harness.tasks.common.merge_evidence`` for a pipeline stage (or what the implementation raised);
    ``table`` None: no module merges (the MoE family's experts fold through the model-level merge only)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from harness.rules.adapters import adapter_modules
    from harness.tasks.merge import cast_once, fold_with_merge, module_merges

    modules = fold = once = error = None
    elsewhere = "another pipeline stage raised while merging (its rank reports what)"

    def attempt(make: Any) -> Any:
        nonlocal error
        try:
            return make()
        except Exception as exc:  # noqa: BLE001 - reported by merge_matches alone
            error = f"{type(exc).__name__}: {exc}"
            return None

    # Every step that a schedule follows is agreed on by every rank first: a stage that raised
    # must not leave the others waiting in the next point-to-point.
    modules = attempt(lambda: module_merges(view, impl, table, alpha) if table is not None else {})
    if any_rank(error is not None):
        return MergeEvidence(modules=modules, error=error or elsewhere)
    for chunk in chunks:
        chunk.eval()
    adapted = logits(chunks)
    merger = impl.LoRAMerge()
    how = "model" if callable(merger) else "harness"
    merged = attempt(lambda: chunks_of(merger(handed_over(chunks, layout))) if how == "model"
                     else [fold_with_merge(chunk, merger, alpha) for chunk in chunks])
    if any_rank(error is not None):
        return MergeEvidence(modules=modules, error=error or elsewhere)
    fold = ModelFold(adapted_output=adapted, merged_output=logits(merged),
                     left=sorted(adapter_modules(global_view(merged)))[:5], how=how)
    group = parallel_state.get_tensor_model_parallel_group()
    once = attempt(lambda: cast_once(impl, group, dist.get_world_size(group), parallel_state.get_tensor_model_parallel_rank()))
    return MergeEvidence(modules=modules, fold=fold, cast_once=once, error=error)

