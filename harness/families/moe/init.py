"""The MoE family's init task: the implementation's initial adapters on an init-sized MoE GPT, full, by global name."""

from __future__ import annotations

import warnings
from typing import Any

from harness import cpu
from harness.contract import DEFAULT_TARGET_MODULES, load_impl
from harness.evidence import InitExtras
from harness.families.gpt.model import output_layer_gathers
from harness.evidence import RankRecord
from harness.rules.adapters import adapter_modules, moe_adapter_table
from harness.tasks.common import any_rank, checked_table
from harness.tasks.init import INIT_DIM, INIT_HIDDEN, INIT_VOCAB

__all__ = ["moe_init_case", "run_moe_init_case"]


def moe_init_case(case: Any) -> Any:
    """The MoE init run's case: the case's experts, routing and flags on init-sized widths.

    Hidden 128, expert and shared-expert widths 128, rank 128 (times top-k
    with ``normalize_moe_lora``, so experts keep rank 128), rounded up to a
    multiple of TP and ETP: every expert A and B, shared or per expert, has
    at least 128 x 128 entries.
    """
    import dataclasses
    import math

    layout, shape = case.layout, case.shape
    tp, etp = layout.tp, layout.etp_size
    topk = shape.moe_router_topk
    unit = math.lcm(tp, etp * topk if case.lora.get("normalize_moe_lora") else etp)
    dim = -(-INIT_DIM * (topk if case.lora.get("normalize_moe_lora") else 1) // unit) * unit
    big = dataclasses.replace(
        shape,
        num_layers=layout.stages,  # one layer per pipeline stage
        hidden_size=INIT_HIDDEN,
        num_attention_heads=max(8, tp),
        num_query_groups=max(4, tp),
        vocab_size=max(INIT_VOCAB, tp),
        moe_ffn_hidden_size=INIT_HIDDEN,
        shared_expert_ffn_hidden_size=None if shape.shared_expert_ffn_hidden_size is None else INIT_HIDDEN,
    )
    return case.with_(shape=big, lora=dict(case.lora, dim=dim))


def run_moe_init_case(ctx: Any, case: Any) -> RankRecord:
    """The implementation's initial adapters on an init-sized MoE GPT (``moe_init_case``), full, by global name.

    Expert adapters are collected as the MoE task collects them (gathered
    over (E)TP, per-expert ones over EP), so every rank sends full matrices.
    """
    from megatron.core import parallel_state as ps

    from harness.families.moe.model import build_moe_stage, expert_sizes
    from harness.families.moe.tasks import assemble, full_partitions
    from harness.pipeline import chunks_of, global_view, handed_over, merged, stage_gathered

    big = moe_init_case(case)
    layout = big.layout
    layout.initialize_megatron(ctx.world_size, seed=case.seed)
    impl = load_impl(case.impl)
    sizes = dict(expert_sizes(), world=ctx.world_size)
    lora_kwargs = big.lora_kwargs()
    targets = "case"

    def adapted(kwargs: dict[str, Any]) -> Any:
        """The init model adapted, under the whole model's names (at a pipeline layout this rank's stage)."""
        fresh = build_moe_stage(big, parallel_output=not output_layer_gathers(case.contract))
        cpu.manual_seed(case.seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return global_view(chunks_of(impl.LoRA(**kwargs)(handed_over(fresh, layout), training=case.training)))

    model = adapted(lora_kwargs)
    if any_rank(not adapter_modules(model)):
        targets = "default"
        lora_kwargs.update(target_modules=list(DEFAULT_TARGET_MODULES), exclude_modules=[])
        big = big.with_(lora=dict(big.lora, target_modules=list(DEFAULT_TARGET_MODULES), exclude_modules=[]))
        model = adapted(lora_kwargs)
    table, broken = checked_table(lambda: moe_adapter_table(model, big, sizes), ctx.rank, sizes["tp_rank"], sizes["tp_size"])
    if broken is not None:
        return broken
    mine = assemble({p: model.get_parameter(p) for p in table}, table, sizes)
    stages = stage_gathered((mine, full_partitions(table, mine)))
    initial = merged([st[0] for st in stages]) or {}
    partitions = merged([st[1] for st in stages]) or {}
    return RankRecord(
        rank=ctx.rank, tp_rank=sizes["tp_rank"], tp_size=sizes["tp_size"], dp_rank=ps.get_data_parallel_rank(),
        output=None, input_grad=None, adapter_grads={},
        initial_adapters=initial,
        partitions=partitions,
        extras=InitExtras(init_shape=big.shape.to_dict(), dim=big.lora["dim"], targets=targets),
    )
