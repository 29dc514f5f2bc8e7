"""The MoE forward/backward task at a pipeline layout (pp > 1): megatron-core's schedule over MoE stages.

What ``run_moe_case`` does at PP=1, with the model built as megatron builds it for a pipeline
(``build_moe_stage``: one chunk per virtual stage) and handed to the implementation as megatron hands it
over (``harness.pipeline``). The adapter table, the seeded weights and every comparison use the whole
model's names (``global_view``); each stage puts its own adapters back together over expert-TP and EP
(``assemble``, its collectives inside the stage), and ``stage_gathered`` then gives every rank of the
pipeline group the whole model's evidence, so the parent compares it as at PP=1. The forward and backward
pass is one micro-batch through megatron-core's schedule; the logits with the implementation's own
adapters, after the SGD step, and before and after the merge come from forward-only schedules, the last
stage's on every rank.
"""

from __future__ import annotations

from typing import Any

import torch

from harness import cpu
from harness.dropout import keyed_dropout
from harness.evidence import DropoutStats, MoEExtras, RankRecord
from harness.families.gpt.pipeline import pipeline_merge_evidence
from harness.families.moe.case import MoECase
from harness.families.moe.stage import moe_io, moe_stage
from harness.families.moe.tasks import (
    SGD_LR,
    _ddp_reduce,
    assemble,
    counting_expert_tokens,
    full_partitions,
    load_seeded_adapters,
)
from harness.pipeline import chunks_of, global_view, handed_over, merged, padded, run_schedule, stage_gathered
from harness.results import Finding
from harness.rules.adapters import moe_adapter_table
from harness.sharding import seeded_tensor
from harness.tasks.common import (
    checked_table,
    cpu64,
    reapply_findings,
    sequence_gathered,
    stage_local_findings,
    stage_record,
    state_findings,
)

__all__ = ["run_moe_pipeline_case"]


def run_moe_pipeline_case(ctx: Any, case: MoECase) -> RankRecord:
    """Forward, backward and one SGD step of a LoRA-adapted, pipelined MoE GPTModel at the case's layout."""
    from megatron.core import parallel_state as ps

    layout = case.layout
    impl, sizes, chunks = moe_stage(ctx, case)
    lora_kwargs = case.lora_kwargs()
    cpu.manual_seed(case.seed)
    model = impl.LoRA(**lora_kwargs)(handed_over(chunks, layout), training=case.training)
    chunks = chunks_of(model)
    view = global_view(chunks)
    same_mode = all(c.training == case.training for c in chunks)
    view.training = case.training if same_mode else not case.training
    table, broken = checked_table(lambda: moe_adapter_table(view, case, sizes), ctx.rank, sizes["tp_rank"],
                                  sizes["tp_size"])
    if broken is not None:
        return broken
    shared = sorted(p for p, i in table.items() if i.shared)
    created = {p: view.get_parameter(p).detach().clone().cpu() for p in shared}
    initial = assemble({p: view.get_parameter(p) for p in table}, table, sizes)

    tp, tp_rank = sizes["tp_size"], sizes["tp_rank"]
    s, b, vocab = case.shape.seq_length, case.shape.micro_batch_size, case.shape.vocab_size
    io = moe_io(case, sizes)
    tokens: dict[str, list[int]] = {}

    # Value-keyed dropout masks (harness.dropout), as at PP=1; a dropping call in eval counts against
    # the first chunk's mode (every chunk's, when they agree).
    with keyed_dropout(chunks[0]) as dropout_log:
        own_output = io.logits(chunks)
        load_seeded_adapters(view, table, case, sizes)
        findings = state_findings(view, {p: (i.name.split(".adapter.")[0],) for p, i in table.items()}, case)
        findings += stage_local_findings(chunks, view, lora_kwargs)
        x = io.x.clone().requires_grad_(True)
        probe = seeded_tensor(case.seed, "probe", (b, s, vocab))
        with counting_expert_tokens(view, tokens):
            outputs = run_schedule(chunks, padded([{"x": x, "probe": probe}], layout), io.forward,
                                   lambda out, batch: (out * batch["probe"].to(out.dtype)).sum(),
                                   seq_length=s, micro_batch_size=b)
        if outputs and outputs[0].dtype != case.model_dtype:
            findings.append(Finding(
                "contract", f"logits dtype {outputs[0].dtype}, the base model computes in {case.model_dtype} "
                "(the adapter output must be cast back)", "output_dtype"))
        grads_local = {p: view.get_parameter(p).grad for p in table}
        shared_stepped = stepped_output = None
        if case.training:
            _ddp_reduce(view, table, layout, ctx.world_size)
            grads = assemble({p: view.get_parameter(p).grad for p in table}, table, sizes)
            with torch.no_grad():
                for pname in table:
                    p = view.get_parameter(pname)
                    p.sub_(SGD_LR * p.grad.to(p.dtype))
            stepped_output = io.logits(chunks)
            shared_stepped = {p: view.get_parameter(p).detach().clone().cpu() for p in shared}
        else:
            grads = assemble(grads_local, table, sizes)
    first_stage = ps.is_pipeline_first_stage(ignore_virtual=True)
    input_grad = (sequence_gathered(x.grad) if layout.sp else x.grad) if first_stage else None
    findings += reapply_findings(view, impl, lora_kwargs, case.training, case.contract,
                                 handed=handed_over(chunks, layout), names=lambda m: global_view(chunks_of(m)))
    merge = pipeline_merge_evidence(chunks, view, impl, None, lora_kwargs.get("alpha", 32), layout, io.logits)
    mine = {
        "output": cpu64(outputs[0]) if outputs else None,
        "input_grad": cpu64(input_grad),
        "grads": {k: cpu64(v) for k, v in grads.items()},
        "initial": {k: cpu64(v) for k, v in initial.items()},
        "partitions": full_partitions(table, initial),
        "tokens": dict(tokens),
    }
    stages = stage_gathered(mine)
    extras = MoEExtras(dropout=DropoutStats.of(dropout_log), merge=merge, own_output=own_output,
                       ep_rank=sizes["ep_rank"], etp_rank=sizes["etp_rank"],
                       expert_tokens=merged([st["tokens"] for st in stages]) or {}, shared_created=created,
                       shared_stepped=shared_stepped, stepped_output=stepped_output)
    return stage_record(ctx, tp_rank, tp, stages, findings, extras)
