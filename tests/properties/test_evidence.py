"""Typed evidence (harness.evidence): a property that reads a field its task did not produce fails loudly.

Before, a rank task's evidence was a dict read with ``.get(key, {})``: a
renamed or misspelt key read as "nothing to check" and the property passed
on an empty dict. Now every field is declared on the task's dataclass and
properties read attributes; these tests pin that down on hand-made records
(no processes).
"""

from __future__ import annotations

import ast
import dataclasses
import pickle
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from harness.evidence import (
    EXTRAS_TYPES, DenseExtras, DropoutStats, InitExtras, MergeEvidence, ModelFold, ModuleMerge, MoEExtras, VLMBase,
    VLMCombo, VLMExtras, ZeroForward, evidence_field, evidence_path,
)
from harness.families.gpt.case import GPTCase
from harness.families.gpt.model import GPTShape
from harness.layouts import ParallelLayout
from harness.properties import get_property
from harness.properties._gather import replicas
from harness.results import Check
from harness.evidence import Partitioned, RankRecord

PROPERTIES = Path(__file__).resolve().parents[2] / "harness" / "properties"
PARAM = "decoder.layers.0.self_attention.linear_qkv.adapter.linear_in.weight"


def _merge() -> MergeEvidence:
    out = torch.zeros(2, 3, dtype=torch.float64)
    return MergeEvidence(modules={"m": ModuleMerge(torch.ones(2), torch.ones(2), "torch.float32", "torch.float32")},
                         fold=ModelFold(out, out.clone(), [], "model"), cast_once={"column": None, "row": None})


def _dense(rank: int = 0, stepped=None) -> RankRecord:
    extras = DenseExtras(dropout=DropoutStats(calls=0, elements=0, dropped=0, eval_calls=0), merge=_merge(),
                         stepped_adapters=stepped)
    return RankRecord(rank=rank, tp_rank=0, tp_size=1, dp_rank=0, output=torch.zeros(2, 3, dtype=torch.float64),
                      input_grad=None, adapter_grads={}, initial_adapters={},
                      partitions={PARAM: Partitioned(PARAM.split(".adapter.")[0], None, False, (2, 2))}, extras=extras)


def _case(**kw) -> GPTCase:
    return GPTCase(shape=GPTShape(num_layers=1), lora=dict(dim=2), seed=1, layout=ParallelLayout(), **kw)


def test_a_property_reading_a_field_its_task_did_not_produce_raises():
    """A misspelt field, or one of another task, is an AttributeError at the first run (the driver reports
    it as a crash), where ``extras.get(key, {})`` passed on an empty dict."""

    def misspelt(ev) -> Check:
        result = Check("misspelt")
        for rec in ev.impl:
            for name, t in rec.extras.stepped_adaptors.items():  # sic: the task writes stepped_adapters
                result.fail(f"{name}: {t}")
        return result

    ev = SimpleNamespace(case=_case(), impl=[_dense()])
    with pytest.raises(AttributeError, match="stepped_adaptors"):
        misspelt(ev)
    # A real property on another task's evidence: init_follows_distribution reads the init task's
    # zero_forward, which the forward/backward task never produces.
    with pytest.raises(AttributeError, match="zero_forward"):
        get_property("init_follows_distribution").check(SimpleNamespace(case=_case(), init=[_dense()]))
    # A record with no evidence at all (a violation record) is no empty dict either.
    with pytest.raises(AttributeError):
        RankRecord(0, 0, 1, 0, None, None, {}, {}, {}).extras.dropout


def test_gather_paths_are_checked_against_the_fields():
    assert evidence_path(DenseExtras, "stepped_adapters") == "extras.stepped_adapters"
    with pytest.raises(AttributeError, match="DenseExtras has no field 'stepped_adaptors'"):
        evidence_path(DenseExtras, "stepped_adaptors")
    with pytest.raises(AttributeError, match="MoEExtras"):
        evidence_path(MoEExtras, "stepped_adapters")  # the MoE task steps, but sends no stepped adapters
    layout = ParallelLayout()
    stepped = {PARAM: torch.ones(2, 2)}
    ((_, got),) = replicas([_dense(stepped=stepped)], layout, "extras.stepped_adapters")
    assert set(got) == {PARAM}
    # Not produced on this example (inference): no tensor, read explicitly as such.
    ((_, got),) = replicas([_dense()], layout, "extras.stepped_adapters")
    assert got == {}
    with pytest.raises(AttributeError, match="has no field 'stepped_adaptors'"):
        replicas([_dense(stepped=stepped)], layout, "extras.stepped_adaptors")
    with pytest.raises(AttributeError, match="NoneType"):
        evidence_field(None, "stepped_adapters")
    # A method or class attribute is no evidence field.
    with pytest.raises(AttributeError):
        evidence_field(DropoutStats(0, 0, 0, 0), "of")


def test_the_properties_read_only_declared_fields():
    """Every ``<x>.extras.<field>`` a property module reads, and every ``"extras.<field>"`` path it names,
    is a field of some task's evidence type (checked on the source, without running anything)."""
    declared = {f.name for kind in EXTRAS_TYPES for f in dataclasses.fields(kind)}
    read: list[tuple[str, str]] = []
    for path in sorted(PROPERTIES.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "extras":
                read.append((path.name, node.attr))
            elif (isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("extras.")
                  and node.value[len("extras."):].isidentifier()):  # a path, not the bare prefix _gather strips
                read.append((path.name, node.value[len("extras."):]))
    assert read, "no property reads evidence: the scan is broken"
    unknown = [(module, name) for module, name in read if name not in declared]
    assert not unknown, f"properties read fields no task produces: {unknown}"


def test_evidence_is_typed_frozen_and_pickles():
    moe = MoEExtras(dropout=DropoutStats(1, 2, 1, 0), merge=MergeEvidence(error="MergeAPIError: no merge"),
                    own_output=torch.ones(2), ep_rank=1, etp_rank=0, expert_tokens={"e": [1, 2]}, shared_created={})
    records = [
        _dense(stepped={PARAM: torch.ones(2, 2)}), moe,
        VLMExtras(base=VLMBase(["p"], ["l"], ["o"]), combos=[VLMCombo(flags={"freeze_vision_model": True}, training=True,
                                                                       access="list", error="TypeError: x")]),
        InitExtras(init_shape={"hidden_size": 128}, dim=128, targets="case", zero_forward=ZeroForward(True, 0.0)),
    ]
    for value in records:
        back = pickle.loads(pickle.dumps(value))
        assert type(back) is type(value)
    assert pickle.loads(pickle.dumps(moe)).merge.error == "MergeAPIError: no merge"
    with pytest.raises(dataclasses.FrozenInstanceError):
        moe.etp_rank = 1
    # A producer that misspells a field fails where it builds the record.
    with pytest.raises(TypeError):
        DenseExtras(dropout=DropoutStats(0, 0, 0, 0), merge=MergeEvidence(), stepped_adaptors={})
    # Required fields: the MoE task cannot forget the logits ep_size_independent compares.
    with pytest.raises(TypeError):
        MoEExtras(dropout=DropoutStats(0, 0, 0, 0), merge=MergeEvidence(), ep_rank=0, etp_rank=0,
                  expert_tokens={}, shared_created={})


def test_merge_check_on_typed_evidence():
    """merge_matches reads the typed merge evidence: an error is reported as before, a clean record passes."""
    case = _case()
    ok = get_property("merge_matches").check(SimpleNamespace(case=case, impl=[_dense()]))
    assert ok.passed and not ok.findings
    broken = _dense()
    broken = dataclasses.replace(broken, extras=dataclasses.replace(
        broken.extras, merge=MergeEvidence(error="MergeAPIError: LoRAMerge.merge takes no TP arguments")))
    result = get_property("merge_matches").check(SimpleNamespace(case=case, impl=[broken]))
    assert [f.message for f in result.findings] == ["rank 0: LoRAMerge's API: LoRAMerge.merge takes no TP arguments"]
