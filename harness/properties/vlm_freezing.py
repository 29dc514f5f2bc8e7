"""vlm_freezing_follows_spec: VLMLoRA on megatron-core's LLaVA freezes, adapts and trains what SPEC says.

For every one of the 16 combinations of the three freeze flags and
``training`` the task (``harness.families.vlm.tasks``) ran at the case's layout, on
every rank:

* ``adapted_modules``: the parameter names are SPEC's for exactly the
  modules its matching selects (``<module>.to_wrap.<p>`` for the base,
  ``<module>.adapter.linear_in.weight`` / ``.linear_out.weight``), with the
  patterns reaching into the vision tower and the projection;
* ``trainable_set``: the parameters with ``requires_grad=True`` are the
  ones SPEC's freeze rules leave trainable (``harness.rules.vlm.expected_trainable``,
  computed here from names alone);
* ``reference``: they equal what ``lora.reference``'s VLMLoRA leaves
  trainable on the same model at world size 1 (names do not depend on TP);
* ``mode``: every module is in train mode after ``training=True`` and in
  eval mode after ``training=False``;
* ``optimizer_step``: after one forward, backward and optimizer step over
  all parameters exactly the trainable parameters changed; every frozen
  one is bitwise unchanged;
* ``access``: the model reached VLMLoRA as itself, as ``[model]`` or as a
  wrapper's ``.llava_model`` (Megatron-Bridge's forms; the form cycles over
  the combinations), and VLMLoRA neither raised nor lost the model;
* ``none parts``: with ``vision_model`` or ``vision_projection`` set to None
  (a pipeline stage without the encoder), VLMLoRA skips it and the rest
  follows the same rules.
"""

from __future__ import annotations

from typing import Any

from harness.evidence import VLMBase, VLMCombo
from harness.properties import Property, register
from harness.properties._gather import rank_findings
from harness.results import Check
from harness.rules.vlm import FREEZE_FLAGS, VLM_PARTS, expected_adapted_modules, expected_param_names, expected_trainable

SHOWN = 4
PREFIX = {"model": "", "list": "", "llava_model": "llava_model."}

_FREEZE_RULE = (
    "SPEC: freeze_model freezes every parameter of each flagged subtree and leaves the others alone; with "
    "training=True it runs before the transform and every adapter ends trainable, with training=False it runs "
    "again after it, so adapters inside flagged subtrees end frozen and everything else keeps its flag"
)


def combo_label(combo: VLMCombo) -> str:
    flags = ", ".join(f"{f}={combo.flags[f]}" for f in FREEZE_FLAGS)
    access = {"model": "the model", "list": "[model]", "llava_model": "a wrapper's .llava_model"}[combo.access]
    return f"VLMLoRA({flags})(<{access}>, training={combo.training})"


def _names(names: list[str] | set[str]) -> str:
    names = sorted(names)
    more = f" (+{len(names) - SHOWN} more)" if len(names) > SHOWN else ""
    return f"{names[:SHOWN]}{more}"


def expected_modules(base: VLMBase, lora: dict[str, Any], access: str) -> set[str]:
    """The adapted modules (names relative to the LLaVA model) for the walk VLMLoRA makes from ``access``."""
    prefix = PREFIX[access]
    picked = expected_adapted_modules(
        [prefix + m for m in base.linear], lora.get("target_modules") or [], lora.get("exclude_modules") or [],
        [prefix + m for m in base.other],
    )
    return {m[len(prefix):] for m in picked}


def combo_findings(result: Check, rank: int, combo: VLMCombo, base: VLMBase, lora: dict[str, Any],
                   reference: VLMCombo | None, contract: str = "strict", stage: bool = False) -> None:
    """Every SPEC rule one combination on one rank breaks, one finding each, naming the combination."""
    where = f"rank {rank}: {combo_label(combo)}"
    part = combo.none_part
    if part is not None:
        where += f" on a model whose {part} is None"
        # The model without that subtree: SPEC skips a part that is None.
        base = VLMBase(*([n for n in names if n != part and not n.startswith(part + ".")]
                         for names in (base.params, base.linear, base.other)))
    if combo.error:
        why = " (SPEC: freeze_model skips a part that is None)" if part is not None else ""
        # Megatron-Bridge takes the model as a list of chunks only: the other
        # access forms are SPEC's (contract point vlm_access_forms).
        other_form = combo.access != "list"
        if other_form:
            why += " (SPEC: VLMLoRA also takes the model itself and a wrapper's .llava_model, not only [model])"
        result.fail(f"{where} raised {combo.error}{why}", kind="contract",
                    check="vlm_access_forms" if other_form else "access",
                    binding=not (other_form and contract == "bridge"))
        return
    flags = {f: combo.flags[f] for f in FREEZE_FLAGS}
    adapted = expected_modules(base, lora, combo.access)
    want_params = expected_param_names(base.params, adapted)
    got_params = set(combo.params)
    if got_params != want_params:
        missing, extra = want_params - got_params, got_params - want_params
        result.fail(
            f"{where}: parameters {_names(missing)} missing and {_names(extra)} unexpected; SPEC's matching of "
            f"target_modules={lora.get('target_modules')} exclude_modules={lora.get('exclude_modules')} adapts "
            f"{_names(adapted)}, each as <module>.to_wrap.* + <module>.adapter.linear_in.weight / linear_out.weight",
            kind="contract", check="adapted_modules",
        )
    trainable = set(combo.trainable)
    want = expected_trainable(got_params, training=combo.training, **flags)
    if trainable != want:
        flagged = [p for p, f in zip(VLM_PARTS, (flags[f] for f in FREEZE_FLAGS)) if f]
        parts = []
        if trainable - want:
            parts.append(f"trainable but SPEC freezes them: {_names(trainable - want)}")
        if want - trainable:
            parts.append(f"frozen but SPEC leaves them trainable: {_names(want - trainable)}")
        result.fail(f"{where}: {'; '.join(parts)} (flagged subtrees {flagged}; {_FREEZE_RULE})",
                    kind="contract", check="trainable_set")
    # At a pipeline layout a rank holds one stage: the reference's trainable set restricted to its parameters.
    ref = None if reference is None or reference.error else set(reference.trainable)
    if ref is not None and stage:
        ref &= got_params
    if ref is not None and ref != trainable:
        result.fail(
            f"{where}: trainable set differs from lora.reference's VLMLoRA at world size 1: only here "
            f"{_names(trainable - ref)}, only in the reference {_names(ref - trainable)}",
            kind="contract", check="reference",
        )
    if combo.not_in_mode:
        mode = "train" if combo.training else "eval"
        result.fail(f"{where}: modules not in {mode} mode: {_names(combo.not_in_mode)} "
                    f"(SPEC: training={combo.training} puts the model in {mode} mode)", kind="contract", check="mode")
    if combo.changed is not None:
        changed = set(combo.changed)
        if changed - trainable:
            result.fail(f"{where}: one optimizer step changed frozen parameters {_names(changed - trainable)} "
                        "(a frozen parameter must stay bitwise unchanged)", kind="contract", check="optimizer_step")
        if trainable - changed:
            stuck = trainable - changed
            no_grad = stuck & set(combo.no_grad)
            why = f"; no gradient reached {_names(no_grad)}" if no_grad else ""
            result.fail(f"{where}: one optimizer step left trainable parameters {_names(stuck)} unchanged{why} "
                        "(requires_grad=True must mean the parameter trains)", kind="contract", check="optimizer_step")


def check(ev) -> Check:
    result = rank_findings("vlm_freezing_follows_spec", ev.impl)
    lora = dict(ev.case.lora)
    ref_combos = ev.reference.extras.combos
    for rec in ev.impl:
        base = rec.extras.base
        for i, combo in enumerate(rec.extras.combos):
            combo_findings(result, rec.rank, combo, base, lora, ref_combos[i], ev.case.contract,
                           stage=ev.case.layout.pp > 1)
    return result


def _applies(layout, capabilities):
    if not capabilities.vlm:
        return "the implementation does not declare VLMLoRA support"
    return None


PROPERTY = register(Property(
    pipeline=("vlm",),
    name="vlm_freezing_follows_spec",
    check=check,
    needs=("impl", "reference"),
    families=("vlm",),
    kind="contract",
    doc="VLMLoRA on megatron-core's LLaVA, for all 8 freeze-flag combinations x training: SPEC's trainable set "
    "(and lora.reference's), train/eval mode, exactly the trainable parameters change in an optimizer step, "
    "patterns into the vision tower and projection adapt exactly the modules SPEC selects; the model reached "
    "as itself, [model] or a wrapper's .llava_model",
    applies=_applies,
))
