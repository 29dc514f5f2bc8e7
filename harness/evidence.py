"""What a rank task hands to the properties: the rank's record (``RankRecord``: outputs, gradients,
adapters and their partitions, findings; ``ErrorRecord`` for the bad-input task) and, typed per
task, the evidence only some properties read.

``RankRecord.extras`` holds one of these (None only on a record that
carries no evidence at all: ``harness.tasks.common.violation_record``):

* ``DenseExtras``: the dense forward/backward task (``harness.families.gpt.tasks``);
* ``MoEExtras``: the MoE forward/backward task (``harness.families.moe.tasks``);
* ``VLMExtras``: the VLM freezing task (``harness.families.vlm.tasks``);
* ``InitExtras``: the init tasks (``harness.families.gpt.init``, ``harness.families.moe.init``);
* ``SwitchExtras``: the adapter switch task (``harness.tasks.switch``);
* ``RecomputeExtras``: the activation recompute task (``harness.tasks.recompute``).

Every field is declared with its type. A field that a task produces only on
some examples (after a training step, with dropout at TP > 1, with a zero
init) is Optional, and None means "not produced on this example": a
property tests ``is None`` itself, so nothing reads as an empty dict. A
property reads attributes, so a field the task does not produce (or a
misspelt one) is an ``AttributeError`` at the first run, which the driver
reports as a crash, never a pass. ``harness.properties._gather`` reaches
per-rank dicts by the path ``"extras.<field>"``: ``evidence_path`` checks
such a path against the type when a property module is imported, and
``evidence_field`` against the record's own type when it is read.

Records travel between processes by pickle: these are plain dataclasses,
tensors kept as they are.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional, Union

from harness.results import Finding

__all__ = [
    "DropoutStats", "ModuleMerge", "ModelFold", "MergeEvidence", "ForwardExtras", "DenseExtras", "MoEExtras",
    "VLMBase", "VLMCombo", "VLMExtras", "ZeroForward", "InitExtras", "SwitchExtras", "RecomputeRun", "RecomputeExtras",
    "TrainingStep", "TrainingExtras", "CheckpointExtras", "RankExtras", "EXTRAS_TYPES",
    "evidence_path", "evidence_field", "Partitioned", "RankRecord", "ErrorRecord",
]

# Tensors (float64 CPU copies unless said otherwise); ``Any`` keeps this module free of torch.
Tensor = Any


@dataclass(frozen=True)
class DropoutStats:
    """What dropout did in one run's ``harness.dropout.keyed_dropout`` block (``DropoutLog``'s counts)."""

    calls: int         # calls with p > 0 that dropped (training=True)
    elements: int      # elements those calls saw
    dropped: int       # elements zeroed by those calls
    eval_calls: int    # such calls made while the model was in eval mode
    fragile: int = 0   # elements whose keyed decision a rounding difference could flip (harness.dropout)

    @classmethod
    def of(cls, log: Any) -> "DropoutStats":
        return cls(calls=log.calls, elements=log.elements, dropped=log.dropped, eval_calls=log.eval_calls,
                   fragile=log.fragile)


class ModuleMerge(NamedTuple):
    """``LoRAMerge().merge`` on one dense module's shards (``harness.tasks.merge.module_merges``)."""

    got: Tensor          # the implementation's merged shard
    want: Tensor         # W + (alpha/dim) B @ A, this rank's shard, computed by the harness
    got_dtype: str
    base_dtype: str


@dataclass(frozen=True)
class ModelFold:
    """The model-level fold (``harness.tasks.merge.fold_model``)."""

    adapted_output: Tensor   # the adapted model's logits (eval mode)
    merged_output: Tensor    # the folded model's logits on the same input
    left: list[str]          # adapter wrappers the fold left behind (the first five)
    how: str                 # "model": LoRAMerge()(model); "harness": folded with the implementation's merge


@dataclass(frozen=True)
class MergeEvidence:
    """Merge evidence (``harness.tasks.common.merge_evidence``).

    ``error``: what the implementation raised while merging (None: nothing).
    The other fields are None when merging raised before they were made;
    with no error every one is set.
    """

    modules: Optional[dict[str, ModuleMerge]] = None   # per dense module ({} for MoE: experts fold only)
    fold: Optional[ModelFold] = None
    cast_once: Optional[dict[str, Optional[str]]] = None  # "column"|"row" -> None or what was wrong
    error: Optional[str] = None


@dataclass(frozen=True, kw_only=True)
class ForwardExtras:
    """What both forward/backward tasks (dense and MoE) produce."""

    dropout: DropoutStats
    merge: MergeEvidence


@dataclass(frozen=True, kw_only=True)
class DenseExtras(ForwardExtras):
    """The dense task's evidence (``run_gpt_case``)."""

    #: The gathered adapters after one SGD step (training only; None in inference).
    stepped_adapters: Optional[dict[str, Tensor]] = None
    #: What broke "a TP-replicated tensor gets the same mask on every TP rank" with the implementation's
    #: own dropout (training with dropout > 0 at TP > 1 only; None elsewhere).
    dropout_masks: Optional[list[str]] = None


@dataclass(frozen=True, kw_only=True)
class MoEExtras(ForwardExtras):
    """The MoE task's evidence (``run_moe_case``)."""

    own_output: Tensor                      # logits with the implementation's own initial adapters
    ep_rank: int
    etp_rank: int
    expert_tokens: dict[str, list[int]]     # tokens per local expert, per experts module
    shared_created: dict[str, Tensor]       # raw local shards of shared grouped adapters after creation
    #: The same after one optimizer step (training only; None in inference).
    shared_stepped: Optional[dict[str, Tensor]] = None
    #: The logits after that step (training only; None in inference).
    stepped_output: Optional[Tensor] = None


@dataclass(frozen=True)
class VLMBase:
    """The unadapted LLaVA model: parameter names, linear-type modules, other modules."""

    params: list[str]
    linear: list[str]
    other: list[str]


@dataclass(frozen=True)
class VLMCombo:
    """One VLMLoRA call of the VLM task (``harness.families.vlm.tasks``' module docstring).

    ``error`` set: VLMLoRA raised and nothing after it was produced (the
    lists are None). ``no_grad`` / ``changed`` are None where no optimizer
    step was taken (nothing trainable, or a vision part set to None).
    """

    flags: dict[str, bool]        # FREEZE_FLAGS -> value
    training: bool
    access: str                   # "model" | "list" | "llava_model"
    none_part: Optional[str] = None
    error: Optional[str] = None
    params: Optional[list[str]] = None
    trainable: Optional[list[str]] = None
    not_in_mode: Optional[list[str]] = None
    no_grad: Optional[list[str]] = None
    changed: Optional[list[str]] = None


@dataclass(frozen=True)
class VLMExtras:
    """The VLM task's evidence (``run_vlm_case``)."""

    base: VLMBase
    combos: list[VLMCombo]


@dataclass(frozen=True)
class ZeroForward:
    """With a zero init: whether the adapted logits equal the base model's bitwise, and the largest difference."""

    equal: bool
    max_abs: float


@dataclass(frozen=True)
class InitExtras:
    """The init tasks' evidence (``harness.tasks.init``)."""

    init_shape: dict[str, Any]
    dim: int
    targets: str                                  # "case" | "default" (the case's patterns adapted nothing)
    zero_forward: Optional[ZeroForward] = None    # A or B initialised to zero only


@dataclass(frozen=True)
class SwitchExtras:
    """The adapter switch task's evidence: logits (eval mode, same input) at each step of the switching."""

    base: Tensor                     # the base model, before the LoRA was applied
    adapted: Tensor                  # adapted, adapters on
    missing: tuple[str, ...] = ()    # switch methods the LoRA object lacks (nothing else ran then)
    error: Optional[str] = None      # what a switch method raised ("<step>: <Type>: <message>")
    steps: dict[str, Tensor] = field(default_factory=dict)  # step name -> logits (harness.tasks.switch.STEPS)
    changed: tuple[str, ...] = ()    # parameters whose value or requires_grad the switching changed
    tree_changed: bool = False       # the module tree differs after the switching


@dataclass(frozen=True)
class RecomputeRun:
    """One training forward and backward of the recompute task: the logits and every trainable parameter's gradient."""

    logits: Optional[Tensor] = None
    grads: dict[str, Optional[Tensor]] = field(default_factory=dict)  # parameter -> gradient (None: autograd left none)
    error: Optional[str] = None      # what building, applying the LoRA, forward or backward raised ("<Type>: <message>")


@dataclass(frozen=True)
class RecomputeExtras:
    """The activation recompute task's evidence: the run without recompute and one per setting (harness.tasks.recompute)."""

    plain: RecomputeRun
    runs: dict[str, RecomputeRun] = field(default_factory=dict)  # setting name -> its run (in SETTINGS order)
    left_out: dict[str, str] = field(default_factory=dict)  # setting name -> why it was not run (settings_not_run)


@dataclass(frozen=True)
class TrainingStep:
    """One rank after one optimizer step of the training loop (harness.tasks.training)."""

    logits: Any                 # the held-out batch's full logits (float64 CPU)
    adapters: dict[str, Any]    # this rank's adapter tensors (as ``RankRecord.partitions`` describes them)
    #: Replica key -> this rank's tensor: the same key on two ranks must be the same bits
    #: (``"<module>:<adapter>@<shard>/<shards>"``; harness.tasks.training.replica_keys). Megatron side only.
    replicas: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainingExtras:
    """The training task's evidence on one rank: every step, what changed that must not, and any error."""

    steps: list[TrainingStep] = field(default_factory=list)
    base_changed: list[str] = field(default_factory=list)   # base parameters whose values moved (bitwise)
    optimizer: str = ""          # the optimizer class megatron-core built (for the report)
    error: Optional[str] = None  # what the implementation raised in the loop
    #: A bf16 loop's adapter tensors before the first step (its steps record the float32 main values, and
    #: the properties compare what the steps added to these).
    initial: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CheckpointExtras:
    """One side of the checkpoint task (harness.tasks.checkpoint): the held-out logits and this rank's adapter
    tensors (as ``RankRecord.partitions`` describes them) after saving (trained one step) or after loading."""

    logits: Any = None                                     # the held-out batch's full logits (float64 CPU)
    adapters: dict[str, Any] = field(default_factory=dict)
    error: Optional[str] = None       # "<step>: <Type>: <message>" where the implementation or megatron raised
    missing: tuple[str, ...] = ()     # checkpoint methods the LoRA object or the model lack (nothing ran then)
    #: Save side, rank 0: every key of the saved checkpoint -> its global shape (megatron's metadata).
    saved: dict[str, tuple[int, ...]] = field(default_factory=dict)
    #: Save side: the logits of a fresh model at the same layout after ``load_state_dict(state_dict())``, or
    #: what that raised.
    plain_logits: Any = None
    plain_error: Optional[str] = None
    #: Load side: adapter parameters no loaded entry reached, and loaded entries the model did not take.
    not_loaded: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()


RankExtras = Union[DenseExtras, MoEExtras, VLMExtras, InitExtras, SwitchExtras, RecomputeExtras, TrainingExtras,
                   CheckpointExtras]
EXTRAS_TYPES: tuple[type, ...] = (DenseExtras, MoEExtras, VLMExtras, InitExtras, SwitchExtras, RecomputeExtras,
                                  TrainingExtras, CheckpointExtras)

_PREFIX = "extras."


def _field_names(kind: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(kind)] if dataclasses.is_dataclass(kind) else []


def evidence_path(kind: type, name: str) -> str:
    """``"extras.<name>"``, the path ``harness.properties._gather`` reads a per-rank dict by; checked
    now (at a property module's import): ``name`` must be a field of ``kind``."""
    if name not in _field_names(kind):
        raise AttributeError(f"{kind.__name__} has no field {name!r} (its fields: {', '.join(_field_names(kind))})")
    return _PREFIX + name


def evidence_field(extras: Any, name: str) -> Any:
    """``extras.<name>``, where ``name`` must be a declared field of the record's evidence type:
    an ``AttributeError`` naming the type otherwise (also for a record with no evidence)."""
    if name not in _field_names(extras):
        raise AttributeError(f"a rank record's extras ({type(extras).__name__}) has no field {name!r}"
                             + (f" (its fields: {', '.join(_field_names(extras))})" if _field_names(extras) else ""))
    return getattr(extras, name)


# ------------------------------------------------- what a rank sends back


@dataclass(frozen=True)
class Partitioned:
    """How one adapter parameter's shards form the full tensor.

    ``module``: the adapted module's name; ``dim``: split dimension over the
    parameter's TP-like group (None: replicated); ``gated``: per-rank gate|up
    halves; ``full_shape``: the unsharded shape.
    """

    module: str
    dim: Optional[int]
    gated: bool
    full_shape: tuple[int, ...]


@dataclass
class RankRecord:
    """What one rank returns for one forward/backward case."""

    rank: int
    tp_rank: int
    tp_size: int
    dp_rank: int
    output: Any  # float64 CPU tensor
    input_grad: Any
    adapter_grads: dict[str, Any]
    initial_adapters: dict[str, Any]
    partitions: dict[str, Partitioned]
    findings: list[Finding] = field(default_factory=list)
    # The task's own evidence, typed per task (harness.evidence); None only on
    # a record with no evidence (the adapters' names or shapes broke SPEC).
    extras: Optional[RankExtras] = None


@dataclass
class ErrorRecord:
    """What one rank returns for the bad-input case: one finding per broken rule."""

    rank: int
    tp_rank: int
    findings: list[Finding] = field(default_factory=list)
