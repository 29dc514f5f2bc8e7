"""The dense family's init task: the implementation's initial adapters on an init-sized GPT (``harness.tasks.init``)."""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch

from harness import cpu
from harness.contract import DEFAULT_TARGET_MODULES
from harness.evidence import InitExtras, ZeroForward
from harness.families.gpt.case import GPTCase
from harness.families.gpt.model import GPTShape, build_stage, causal_mask
from harness.pipeline import chunks_of, global_view, handed_over, merged, stage_gathered, stage_input, stage_logits
from harness.evidence import Partitioned, RankRecord
from harness.rules.adapters import adapter_modules, adapter_table
from harness.sharding import initial_adapters, seeded_tensor
from harness.tasks.common import any_rank, checked_table, setup
from harness.tasks.init import INIT_FFN, INIT_HIDDEN, INIT_VOCAB, init_dim

__all__ = ["run_init_case", "init_shape"]


def init_shape(case: Any) -> GPTShape:
    """The init run's model for ``case``: fixed widths, the case's gated MLP and bias flags; one layer per
    pipeline stage and chunk (one without a pipeline)."""
    tp = case.layout.tp
    heads, groups = max(8, tp), max(4, tp)
    return GPTShape(
        num_layers=case.layout.stages,
        hidden_size=INIT_HIDDEN,
        num_attention_heads=heads,
        num_query_groups=groups,
        ffn_hidden_size=INIT_FFN,
        vocab_size=max(INIT_VOCAB, tp),
        # Only the zero-init forward reads these: a short sequence, split over TP under SP.
        seq_length=2 * tp,
        micro_batch_size=1,
        gated_linear_unit=case.shape.gated_linear_unit,
        add_bias_linear=case.shape.add_bias_linear,
    )


def run_init_case(ctx: Any, case: GPTCase) -> RankRecord:
    """The implementation's initial adapters on the init model (``init_shape``), and the zero-init forward check."""
    from megatron.core import parallel_state

    impl, tp, tp_rank = setup(ctx, case)
    shape = init_shape(case)
    dim = init_dim(tp)
    zero = "zero" in (case.lora.get("lora_A_init_method", "xavier"), case.lora.get("lora_B_init_method", "zero"))
    device = getattr(ctx, "device", None) or torch.device("cpu")
    s, b, h = shape.seq_length, shape.micro_batch_size, shape.hidden_size
    full_x = seeded_tensor(case.seed, "input", (s, b, h)).to(device=device, dtype=case.model_dtype)
    x = full_x.chunk(tp, dim=0)[tp_rank] if case.layout.sp else full_x
    ids = torch.zeros(b, s, dtype=torch.long, device=device)
    pos = torch.arange(s, device=device).unsqueeze(0).expand(b, s)
    mask = causal_mask(s).to(device)

    layout = case.layout

    def forward(model: Any) -> torch.Tensor:
        """The logits (under a pipeline the last stage's, on every rank, through megatron's schedule)."""
        chunks = chunks_of(model)
        if layout.pp > 1:
            return stage_logits(chunks, stage_input(ids, pos, mask), x, (b, s, shape.vocab_size), layout)
        with torch.no_grad():
            return chunks[0](ids, pos, mask, decoder_input=x).detach().cpu()

    def adapted(lora_kwargs: dict[str, Any]) -> tuple[Any, Optional[torch.Tensor]]:
        cpu.manual_seed(case.seed)
        chunks = build_stage(case.with_(shape=shape), tp)
        for chunk in chunks:
            chunk.train(case.training)
        before = forward(handed_over(chunks, layout)) if zero else None
        # The seed right before the walk, as run_gpt_case has it.
        cpu.manual_seed(case.seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = impl.LoRA(**lora_kwargs)(handed_over(chunks, layout), training=case.training)
        return model, before

    lora_kwargs = dict(case.lora_kwargs(), dim=dim)
    targets = "case"
    model, before = adapted(lora_kwargs)
    if any_rank(not adapter_modules(global_view(chunks_of(model)))):
        targets = "default"
        lora_kwargs.update(target_modules=list(DEFAULT_TARGET_MODULES), exclude_modules=[])
        model, before = adapted(lora_kwargs)
    view = global_view(chunks_of(model))
    initial = initial_adapters(view)
    table, broken = checked_table(lambda: adapter_table(view, tp_rank, tp, dim, layout.pp > 1), ctx.rank, tp_rank, tp)
    if broken is not None:
        return broken
    dp_rank = parallel_state.get_data_parallel_rank()
    zero_forward = None
    if zero:
        after = forward(model)
        same = after.shape == before.shape and after.dtype == before.dtype and torch.equal(after, before)
        diff = float((after.double() - before.double()).abs().max()) if after.shape == before.shape else float("inf")
        zero_forward = ZeroForward(equal=bool(same), max_abs=diff)
    # Every stage's adapters, by global name, on every rank of the pipeline group (one gather).
    stages = stage_gathered(({p: initial.get(p) for p in table},
                             {p: Partitioned(w, part.dim, part.gated, full) for p, (w, part, full) in table.items()}))
    return RankRecord(
        rank=ctx.rank,
        tp_rank=tp_rank,
        tp_size=tp,
        dp_rank=dp_rank,
        output=None,
        input_grad=None,
        adapter_grads={},
        initial_adapters=merged([st[0] for st in stages]) or {},
        partitions=merged([st[1] for st in stages]) or {},
        extras=InitExtras(init_shape=shape.to_dict(), dim=dim, targets=targets, zero_forward=zero_forward),
    )
