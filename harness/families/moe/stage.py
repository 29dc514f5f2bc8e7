"""The MoE model as the family's rank tasks start from it: built at the case's layout, seeded, adapted, its
adapters loaded; at a pipeline layout this rank's stage.

``moe_stage`` builds this rank's chunks (``build_moe_stage``: one GPTModel, or the stage's chunks under
pipeline parallelism) and loads the seeded full base weights by the whole model's names
(``harness.pipeline.global_view``); ``adapted_moe_stage`` applies the implementation's LoRA to the model as
megatron hands it over, checks the adapter table (harness/SPEC.md's names) and loads seeded adapter values.
``moe_io`` gives the held-out input and the logits of a model, through megatron-core's schedule under a
pipeline (the last stage's logits on every rank). What ``harness.families.gpt.stage`` is to the dense tasks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from harness import cpu
from harness.contract import load_impl
from harness.families.gpt.model import causal_mask, output_layer_gathers
from harness.families.moe.model import build_moe_stage, expert_sizes
from harness.families.moe.tasks import load_seeded_adapters
from harness.pipeline import chunks_of, global_view, handed_over, stage_input, stage_logits
from harness.rules.adapters import moe_adapter_table
from harness.sharding import load_full_base_weights, seeded_tensor
from harness.tasks.common import checked_table

__all__ = ["moe_stage", "adapted_moe_stage", "AdaptedMoE", "MoEIO", "moe_io"]


def moe_stage(ctx: Any, case: Any, **overrides: Any) -> tuple[Any, dict[str, int], list[Any]]:
    """(the implementation, the layout's sizes, this rank's chunks with the seeded full base weights);
    ``overrides`` go to megatron's TransformerConfig."""
    case.layout.initialize_megatron(ctx.world_size, seed=case.seed)
    impl = load_impl(case.impl)
    sizes = dict(expert_sizes(), world=ctx.world_size)
    chunks = build_moe_stage(case, parallel_output=not output_layer_gathers(case.contract), **overrides)
    load_full_base_weights(global_view(chunks), case.seed, **{k: v for k, v in sizes.items() if k != "world"})
    return impl, sizes, chunks


@dataclass
class AdaptedMoE:
    """What ``adapted_moe_stage`` made."""

    peft: Any           # the implementation's LoRA object
    model: Any          # what it returned: a module, or a pipeline stage's list of chunks
    view: Any           # the model under the whole model's names
    sizes: dict         # the layout's TP/EP/ETP ranks and sizes, and the world
    table: Any          # the adapter table (None when ``broken``)
    broken: Any         # the violation record every rank sends when the adapters break SPEC naming, else None

    @property
    def chunks(self) -> list[Any]:
        return chunks_of(self.model)


def adapted_moe_stage(ctx: Any, case: Any, *, training: bool, adapter_seed: Optional[int] = None,
                      **overrides: Any) -> AdaptedMoE:
    """The case's MoE model at its layout (config ``overrides``), adapted by the implementation for ``training``,
    its adapters loaded with ``adapter_seed``'s values (default the case's seed)."""
    impl, sizes, chunks = moe_stage(ctx, case, **overrides)
    cpu.manual_seed(case.seed)
    peft = impl.LoRA(**case.lora_kwargs())
    model = peft(handed_over(chunks, case.layout), training=training)
    view = global_view(chunks_of(model))
    table, broken = checked_table(lambda: moe_adapter_table(view, case, sizes), ctx.rank, sizes["tp_rank"],
                                  sizes["tp_size"])
    if broken is None:
        load_seeded_adapters(view, table, case, sizes, seed=adapter_seed)
    return AdaptedMoE(peft, model, view, sizes, table, broken)


@dataclass
class MoEIO:
    """The held-out input of a case on this rank and how a model computes on it."""

    ids: torch.Tensor
    pos: torch.Tensor
    mask: torch.Tensor
    x: torch.Tensor                       # this rank's decoder input (its sequence shard under SP)
    logits: Callable[[Any], torch.Tensor]  # the logits of a model (a module or chunks), no gradient
    forward: Callable[[Any, Any], torch.Tensor]  # ``forward(chunk, batch)`` for ``harness.pipeline.run_schedule``


def moe_io(case: Any, sizes: dict[str, int], name: str = "input") -> MoEIO:
    """The seeded (s, b, h) decoder input ``name`` and the logits of a model on it: the model's own output at
    PP=1, the last stage's through a forward-only schedule, on every rank, under a pipeline."""
    tp, tp_rank = sizes["tp_size"], sizes["tp_rank"]
    s, b, h = case.shape.seq_length, case.shape.micro_batch_size, case.shape.hidden_size
    full = seeded_tensor(case.seed, name, (s, b, h)).to(case.model_dtype)
    x = full.chunk(tp, dim=0)[tp_rank] if case.layout.sp else full
    ids = torch.zeros(b, s, dtype=torch.long)
    pos = torch.arange(s).unsqueeze(0).expand(b, s)
    mask = causal_mask(s)
    forward = stage_input(ids, pos, mask)

    def logits(model: Any) -> torch.Tensor:
        chunks = chunks_of(model)
        if case.layout.pp == 1:
            with torch.no_grad():
                return chunks[0](ids, pos, mask, decoder_input=x)
        return stage_logits(chunks, forward, x, (b, s, case.shape.vocab_size), case.layout)

    return MoEIO(ids, pos, mask, x, logits, forward)
