"""The dense model as a rank task starts from it: built at the case's layout, seeded, adapted, its adapters loaded.

``adapted_stage`` is the set-up the dense tasks share (forward/backward at a pipeline layout, checkpoint,
recompute, training): ``build_stage`` (one GPTModel, or this rank's pipeline chunks), the seeded full base
weights, the implementation's LoRA applied to the model as megatron hands it over, the adapters as the
implementation made them, then seeded adapter weights (B non-zero) through the harness's adapter table,
every name the whole model's (``harness.pipeline.global_view``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from harness import cpu
from harness.families.gpt.model import build_stage
from harness.pipeline import chunks_of, global_view, handed_over
from harness.sharding import initial_adapters, load_full_adapter_weights, load_full_base_weights
from harness.tasks.common import checked_table

__all__ = ["Adapted", "adapted_stage"]


@dataclass
class Adapted:
    """What ``adapted_stage`` made."""

    peft: Any            # the implementation's LoRA object
    model: Any           # what it returned: a module, or a pipeline stage's list of chunks
    view: Any            # the model under the whole model's names (harness.pipeline.global_view)
    initial: dict        # the adapters as the implementation made them (float64 CPU copies)
    table: Any           # the harness's adapter table (None when ``broken``)
    broken: Any          # the violation record every rank sends when the adapters break SPEC naming, else None

    @property
    def chunks(self) -> list[Any]:
        return chunks_of(self.model)


def adapted_stage(ctx: Any, case: Any, impl: Any, tp: int, tp_rank: int, *, training: bool,
                  adapter_seed: Optional[int] = None, **overrides: Any) -> Adapted:
    """The case's model at its layout (config ``overrides``), adapted by ``impl`` for ``training``, its adapters
    loaded with ``adapter_seed``'s values (default the case's seed). A pipeline stage may hold no adapter; the
    model as a whole must (``checked_table``)."""
    chunks = build_stage(case, tp, **overrides)
    load_full_base_weights(global_view(chunks), case.seed, tp_rank, tp)
    kwargs = case.lora_kwargs()
    cpu.manual_seed(case.seed)
    peft = impl.LoRA(**kwargs)
    model = peft(handed_over(chunks, case.layout), training=training)
    view = global_view(chunks_of(model))
    initial = initial_adapters(view)
    seed = case.seed if adapter_seed is None else adapter_seed
    table, broken = checked_table(
        lambda: load_full_adapter_weights(view, seed, tp_rank, tp, kwargs.get("dim", 32), case.layout.pp > 1),
        ctx.rank, tp_rank, tp)
    return Adapted(peft, model, view, initial, table, broken)
