"""The init task: the implementation's initial adapters on a GPT big enough to test their distribution.

``run_init_case`` builds, at the case's layout, a one-layer GPT of a fixed
shape (``init_shape``: hidden 128, ffn 256, vocab 128, heads and query
groups divisible by TP) with the case's gated MLP / bias flags, applies
``impl.LoRA(...)`` with the case's seed, init methods, patterns, alpha,
dropout, dtypes and training mode but rank ``init_dim`` (128, a multiple of
TP), and returns the initial adapters (A and B of every adapted module,
each rank's shard) with the partition table that puts them back together.
No harness weights are loaded and nothing is run backward: the draw itself
is the evidence (``harness.properties.init_distribution`` tests it).

When A or B is initialised to zero, the adapted model must compute exactly
what the base model computes: the task runs the base model's forward on a
seeded input before LoRA is applied and the adapted model's after, and
records on each rank whether the logits are bitwise equal
(``extras["zero_forward"]``).

If the case's patterns adapt no module of this one-layer model (a pattern
naming a second layer, say), the default target modules are used
(``extras["targets"]`` says which).
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch

from harness.cases import GPTCase
from harness.contract import DEFAULT_TARGET_MODULES
from harness.models import GPTShape, build_gpt, causal_mask, output_layer_gathers
from harness.results import Partitioned, RankRecord
from harness.sharding import adapter_modules, adapter_table, initial_adapters, seeded_tensor
from harness.contract import load_impl
from harness.tasks.gpt import _setup, any_rank, checked_table

__all__ = ["run_init_case", "run_moe_init_case", "moe_init_case", "INIT_TASKS", "init_shape", "init_dim", "INIT_HIDDEN", "INIT_FFN", "INIT_VOCAB", "INIT_DIM"]

#: The init model's widths. With rank 128 every adapter matrix has at least
#: 128 * 128 = 16384 entries (see harness.properties.init_distribution for
#: what that buys), and the column/row splits at TP=2 change Xavier's fans
#: by at least a factor 4/3 in variance.
INIT_HIDDEN = 128
INIT_FFN = 256
INIT_VOCAB = 128
INIT_DIM = 128


def init_dim(tp: int) -> int:
    """The adapter rank of the init run: INIT_DIM rounded up to a multiple of ``tp``."""
    return -(-INIT_DIM // tp) * tp


def init_shape(case: GPTCase) -> GPTShape:
    """The init run's model for ``case``: fixed widths, the case's gated MLP and bias flags."""
    tp = case.layout.tp
    heads, groups = max(8, tp), max(4, tp)
    return GPTShape(
        num_layers=1,
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

    impl, tp, tp_rank = _setup(ctx, case)
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

    def forward(model: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return model(ids, pos, mask, decoder_input=x).detach().cpu()

    def adapted(lora_kwargs: dict[str, Any]) -> tuple[torch.nn.Module, Optional[torch.Tensor]]:
        torch.manual_seed(case.seed)
        model = build_gpt(shape, tp=tp, sequence_parallel=case.layout.sp, params_dtype=case.model_dtype,
                          parallel_output=not output_layer_gathers(case.contract))
        model.train(case.training)
        before = forward(model) if zero else None
        # The seed right before the walk, as run_gpt_case has it.
        torch.manual_seed(case.seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = impl.LoRA(**lora_kwargs)(model, training=case.training)
        return model, before

    lora_kwargs = dict(case.lora_kwargs(), dim=dim)
    targets = "case"
    model, before = adapted(lora_kwargs)
    if any_rank(not adapter_modules(model)):
        targets = "default"
        lora_kwargs.update(target_modules=list(DEFAULT_TARGET_MODULES), exclude_modules=[])
        model, before = adapted(lora_kwargs)
    initial = initial_adapters(model)
    table, broken = checked_table(lambda: adapter_table(model, tp_rank, tp, dim), ctx.rank, tp_rank, tp)
    if broken is not None:
        return broken
    dp_rank = parallel_state.get_data_parallel_rank()
    extras: dict[str, Any] = {"init_shape": shape.to_dict(), "dim": dim, "targets": targets}
    if zero:
        after = forward(model)
        same = after.shape == before.shape and after.dtype == before.dtype and torch.equal(after, before)
        diff = float((after.double() - before.double()).abs().max()) if after.shape == before.shape else float("inf")
        extras["zero_forward"] = {"equal": bool(same), "max_abs": diff}
    return RankRecord(
        rank=ctx.rank,
        tp_rank=tp_rank,
        tp_size=tp,
        dp_rank=dp_rank,
        output=None,
        input_grad=None,
        adapter_grads={},
        initial_adapters={p: initial.get(p) for p in table},
        partitions={p: Partitioned(w, part.dim, part.gated, shape) for p, (w, part, shape) in table.items()},
        extras=extras,
    )


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
        num_layers=1,
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

    from harness.moe import build_moe_gpt, expert_sizes, layout_sizes
    from harness.tasks.moe import _assemble, full_partitions, moe_adapter_table

    big = moe_init_case(case)
    layout = big.layout
    layout.initialize_megatron(ctx.world_size, seed=case.seed)
    impl = load_impl(case.impl)
    sizes = dict(expert_sizes(), world=ctx.world_size)
    lora_kwargs = big.lora_kwargs()
    targets = "case"

    def adapted(kwargs: dict[str, Any]) -> torch.nn.Module:
        fresh = build_moe_gpt(big.shape, **layout_sizes(layout), params_dtype=case.model_dtype,
                              parallel_output=not output_layer_gathers(case.contract)).to(case.model_dtype)
        torch.manual_seed(case.seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return impl.LoRA(**kwargs)(fresh, training=case.training)

    model = adapted(lora_kwargs)
    if any_rank(not adapter_modules(model)):
        targets = "default"
        lora_kwargs.update(target_modules=list(DEFAULT_TARGET_MODULES), exclude_modules=[])
        big = big.with_(lora=dict(big.lora, target_modules=list(DEFAULT_TARGET_MODULES), exclude_modules=[]))
        model = adapted(lora_kwargs)
    table, broken = checked_table(lambda: moe_adapter_table(model, big, sizes), ctx.rank, sizes["tp_rank"], sizes["tp_size"])
    if broken is not None:
        return broken
    initial = _assemble({p: model.get_parameter(p) for p in table}, table, sizes)
    return RankRecord(
        rank=ctx.rank, tp_rank=sizes["tp_rank"], tp_size=sizes["tp_size"], dp_rank=ps.get_data_parallel_rank(),
        output=None, input_grad=None, adapter_grads={},
        initial_adapters=initial,
        partitions=full_partitions(table, initial),
        extras={"init_shape": big.shape.to_dict(), "dim": big.lora["dim"], "targets": targets},
    )


#: The init run's task per case family.
INIT_TASKS = {"gpt": run_init_case, "moe": run_moe_init_case}
