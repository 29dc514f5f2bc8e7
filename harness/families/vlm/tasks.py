"""Vision-language task: VLMLoRA on megatron-core's LLaVAModel at the case's layout, for every freeze combination.

``run_vlm_case`` loops over all eight combinations of VLMLoRA's three
freeze flags and both ``training`` values (16 combinations, the same at
every layout; hypothesis draws the shape, the patterns and the seed). For
each it builds a fresh ``harness.families.vlm.model.build_vlm`` model, applies
``impl.VLMLoRA(<flags>, <the case's LoRA fields>)(<access>, training=t)``
and records, in ``RankRecord.extras.combos`` (``harness.evidence.VLMExtras``,
one ``VLMCombo`` per combination):

* ``params`` / ``trainable``: every parameter name of the adapted LLaVA
  model and those with ``requires_grad=True`` (names relative to the LLaVA
  model, whatever the access form);
* ``not_in_mode``: modules whose ``training`` flag is not ``training``;
* ``changed`` / ``no_grad``: after one forward and backward (a seeded
  linear functional of the logits, which reaches every parameter, the
  vision tower and projection included) and one ``torch.optim.Adam`` step
  (lr 0.1, eps 1e-30: the first step moves every parameter whose gradient
  is not zero by about lr, however small the gradient) over *all*
  parameters, the parameters whose values changed and the trainable ones
  no gradient reached (skipped when nothing is trainable);
* ``error``: what VLMLoRA raised, if it did.

Two more combinations follow the sixteen: the model with ``vision_model``,
then ``vision_projection``, set to None (``none_part``), flags and mode
picked by the seed; SPEC skips a part that is None. No step for these (such
a model cannot run forward).

The access form cycles with the combination and the seed over the ways
Megatron-Bridge hands a model to PEFT: the model itself, ``[model]`` (a
list of chunks, the first one used) and a wrapper module whose
``.llava_model`` is the model. ``extras.base`` holds the unadapted
model's parameter names, its linear-type modules and its other modules,
from which the parent computes what SPEC prescribes (``harness.families.vlm.model``);
nothing here decides what is right.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from harness.families.vlm.case import VLMCase
from harness.families.gpt.model import output_layer_gathers
from harness.contract import load_impl
from harness.evidence import VLMBase, VLMCombo, VLMExtras
from harness.evidence import RankRecord
from harness.tasks.common import linear_type

__all__ = ["run_vlm_case", "ACCESS_FORMS", "LLaVAHolder", "access_form", "ADAM_LR"]

#: Parts a model may lack (a pipeline stage without the vision encoder): each is set to None once.
NONE_PARTS = ("vision_model", "vision_projection")
#: How the model reaches VLMLoRA: itself, as the first of a list of chunks, or as a wrapper's ``.llava_model``.
ACCESS_FORMS = ("model", "list", "llava_model")
#: The one optimizer step: Adam's first step is lr * g / (|g| + eps), so with a tiny eps every
#: parameter with a non-zero gradient moves by about lr, even where attention saturates.
ADAM_LR = 0.1
ADAM_EPS = 1e-30


class LLaVAHolder(nn.Module):
    """A module whose ``.llava_model`` is the LLaVA model, as Megatron-Bridge's VLM providers hold it."""

    def __init__(self, llava_model: nn.Module) -> None:
        super().__init__()
        self.llava_model = llava_model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.llava_model(*args, **kwargs)


def access_form(index: int, seed: int) -> str:
    """The access form of combination ``index`` in a case seeded ``seed``: each form covers about a third."""
    return ACCESS_FORMS[(index + seed) % len(ACCESS_FORMS)]



def _inner(result: Any, access: str) -> nn.Module:
    if access == "list":
        return result[0]
    if access == "llava_model":
        return result.llava_model
    return result


def _names(inner: nn.Module, pipeline: bool) -> tuple[dict[int, str], dict[int, str]]:
    """(parameter names, module names) of the LLaVA model (or stage) ``inner``, by ``id``: its own names, or at
    a pipeline layout the whole model's (``harness.pipeline.global_view``: a stage's language layers by their
    global number)."""
    if not pipeline:
        return ({id(p): n for n, p in inner.named_parameters()}, {id(m): n for n, m in inner.named_modules()})
    from harness.pipeline import global_view

    view = global_view([inner])
    modules = {id(m): n for n, m in view.named_modules() if n}
    modules[id(inner)] = ""
    return {id(p): n for n, p in view.named_parameters()}, modules


def _one_combo(impl: Any, case: VLMCase, flags: dict[str, bool], training: bool, access: str, inputs: dict[str, Any],
               tp: int, none_part: Any = None) -> VLMCombo:
    from harness.cpu import seed_model_parallel
    from harness.sharding import seeded_tensor
    from harness.families.vlm.model import build_vlm

    pipeline = case.layout.pp > 1
    seed_model_parallel(case.seed)
    model = build_vlm(case.shape, tp=tp, params_dtype=case.model_dtype,
                      parallel_output=not output_layer_gathers(case.contract), pipeline=case.layout)
    if none_part is not None:
        # A pipeline stage without that part (LLaVA's add_encoder=False leaves
        # vision_model and vision_projection None): SPEC skips None parts.
        setattr(model, none_part, None)
    root: Any = {"model": model, "list": [model], "llava_model": LLaVAHolder(model)}[access]
    made = dict(flags=dict(flags), training=training, access=access, none_part=none_part)
    error, inner = None, None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = impl.VLMLoRA(**flags, **case.lora_kwargs())(root, training=training)
        inner = _inner(result, access)
        if not isinstance(inner, nn.Module):
            raise TypeError(f"VLMLoRA returned {type(result).__name__}, which does not lead to the model via {access}")
    except Exception as exc:  # noqa: BLE001 - the parent reports it for this combination
        error = f"{type(exc).__name__}: {exc}"
    if pipeline:
        from harness.tasks.common import any_rank

        # The step runs through megatron's schedule: every stage takes it, or none (a stage that raised, or a
        # combination that trains nothing on any stage, ends it on all of them).
        failed = any_rank(error is not None)
        trains = any_rank(error is None and any(p.requires_grad for p in inner.parameters()))
        stepping = not failed and trains and none_part is None
    if error is not None:
        return VLMCombo(**made, error=error)
    param_names, module_names = _names(inner, pipeline)
    params = {param_names[id(p)]: p for p in inner.parameters()}
    made.update(
        params=sorted(params),
        trainable=sorted(n for n, p in params.items() if p.requires_grad),
        not_in_mode=sorted(module_names.get(id(m), "?") or "<root>" for m in inner.modules() if m.training != training),
    )
    if not (stepping if pipeline else made["trainable"] and none_part is None):
        # (A LLaVA without one of its parts cannot run forward: no step.)
        return VLMCombo(**made)
    before = {n: p.detach().clone() for n, p in params.items()}
    optimizer = torch.optim.Adam(inner.parameters(), lr=ADAM_LR, eps=ADAM_EPS)
    optimizer.zero_grad()
    if pipeline:
        _pipeline_step(inner, case, inputs)
    else:
        out, _ = inner(**inputs)
        probe = seeded_tensor(case.seed, "probe", tuple(out.shape)).to(device=out.device, dtype=out.dtype)
        (out * probe).sum().backward()
    no_grad = sorted(
        n for n, p in params.items() if p.requires_grad and (p.grad is None or not bool(p.grad.ne(0).any()))
    )
    optimizer.step()
    changed = sorted(n for n, p in params.items() if not torch.equal(before[n], p.detach()))
    return VLMCombo(**made, no_grad=no_grad, changed=changed)


def _pipeline_step(stage: nn.Module, case: VLMCase, inputs: dict[str, Any]) -> None:
    """One forward and backward of the seeded loss through megatron-core's schedule. The images require a
    gradient, so the first stage's output has one even where nothing of that stage trains."""
    from harness.pipeline import run_schedule
    from harness.sharding import seeded_tensor

    shape = case.shape
    b = shape.micro_batch_size
    batch = dict(inputs, images=inputs["images"].clone().requires_grad_(True))
    probe = seeded_tensor(case.seed, "probe", (b, shape.combined_length, shape.vocab_size))
    run_schedule([stage], [batch], lambda chunk, mb: chunk(**mb)[0],
                 lambda out, mb: (out * probe.to(device=out.device, dtype=out.dtype)).sum(),
                 seq_length=shape.combined_length, micro_batch_size=b)


def run_vlm_case(ctx: Any, case: VLMCase) -> RankRecord:
    """All 16 freeze combinations of VLMLoRA on a fresh LLaVA each, at the case's layout."""
    from megatron.core import parallel_state

    from harness.families.vlm.model import build_vlm, freeze_combos, vlm_inputs

    case.layout.initialize_megatron(ctx.world_size, seed=case.seed)
    impl = load_impl(case.impl)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    pristine = build_vlm(case.shape, tp=tp, params_dtype=case.model_dtype,
                         parallel_output=not output_layer_gathers(case.contract), pipeline=case.layout)
    if case.layout.pp > 1:
        from harness.pipeline import global_view

        pristine = global_view([pristine])  # the stage under the whole model's names
    modules = dict(pristine.named_modules())
    base = VLMBase(
        params=sorted(n for n, _ in pristine.named_parameters()),
        linear=sorted(n for n, m in modules.items() if n and linear_type(m)),
        other=sorted(n for n, m in modules.items() if n and not linear_type(m)),
    )
    del pristine, modules
    # Seeded on the CPU, then moved: the same values on every device.
    device = getattr(ctx, "device", None) or torch.device("cpu")
    inputs = {k: v.to(device) for k, v in vlm_inputs(case.shape, case.seed, tp, case.model_dtype).items()}
    combos = [
        _one_combo(impl, case, flags, training, access_form(i, case.seed), inputs, tp)
        for i, (flags, training) in enumerate(freeze_combos())
    ]
    # Each vision part set to None once, with a combination picked by the seed.
    everything = freeze_combos()
    for k, part in enumerate(NONE_PARTS):
        flags, training = everything[(case.seed + 5 * k) % len(everything)]
        combos.append(_one_combo(impl, case, flags, training, access_form(k, case.seed), inputs, tp, none_part=part))
    return RankRecord(
        rank=ctx.rank, tp_rank=tp_rank, tp_size=tp, dp_rank=parallel_state.get_data_parallel_rank(),
        output=None, input_grad=None, adapter_grads={}, initial_adapters={}, partitions={},
        extras=VLMExtras(base=base, combos=combos),
    )
