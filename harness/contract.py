"""The contract the harness checks, owned by the harness: names, tables, errors, capability profiles.

This module is the harness's own statement of what a LoRA implementation must
do (``harness/SPEC.md`` is the prose; ``tests/house/test_contract_doc.py`` checks the
two agree). It imports nothing from ``lora``: the code under test never
supplies the rules it is judged by.

Two contracts exist:

* ``strict``: the project's SPEC, which is deliberately stricter than
  Megatron-Bridge on a few points (``STRICTER_THAN_BRIDGE``);
* ``bridge``: Megatron-Bridge 0.6.2's documented/observed behaviour on those
  points.

An implementation declares which one it follows, and what it supports, with
a ``Capabilities`` profile: either a module-level dict
``LORA_HARNESS_CAPABILITIES`` in the implementation (plain data, so it need
not import the harness), or an explicit ``Capabilities`` passed to the
runner. The harness draws only inside the profile and says what it skipped.
"""

from __future__ import annotations

import importlib
import reprlib
import sys
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Mapping, Optional
from harness.errors import ImplLoadError

__all__ = [
    "REQUIRED_NAMES",
    "DEFAULT_TARGET_MODULES",
    "INIT_METHODS",
    "BRIDGE_INIT_METHODS",
    "DROPOUT_POSITIONS",
    "LORA_FIELDS",
    "PARAM_SUFFIXES",
    "ContractPoint",
    "STRICTER_THAN_BRIDGE",
    "CONTRACTS",
    "Capabilities",
    "ImplLoadError",
    "load_impl",
    "capabilities_of",
]

REQUIRED_NAMES = ("LoRA", "VLMLoRA", "LoRAMerge")
DEFAULT_TARGET_MODULES = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
INIT_METHODS = ("xavier", "xavier_uniform", "kaiming", "normal", "zero")
BRIDGE_INIT_METHODS = ("xavier", "kaiming", "normal", "zero")
DROPOUT_POSITIONS = ("pre", "post")
CONTRACTS = ("strict", "bridge")

# SPEC "LoRA fields": name -> default.
LORA_FIELDS: Mapping[str, Any] = {
    "target_modules": list(DEFAULT_TARGET_MODULES),
    "exclude_modules": [],
    "dim": 32,
    "alpha": 32,
    "dropout": 0.0,
    "dropout_position": "pre",
    "a2a_experimental": False,
    "lora_A_init_method": "xavier",
    "lora_B_init_method": "zero",
    "lora_dtype": None,
    "normalize_moe_lora": False,
    "share_expert_adapters": True,
}

# Parameter names of an adapted module <m> (Bridge's, so checkpoints interchange).
PARAM_SUFFIXES: Mapping[str, str] = {
    "base": "to_wrap.weight",
    "A": "adapter.linear_in.weight",
    "B": "adapter.linear_out.weight",
}


@dataclass(frozen=True)
class ContractPoint:
    """One behaviour on which SPEC and Megatron-Bridge differ.

    ``strict`` / ``bridge``: what each contract expects, as a short phrase;
    ``strict_errors`` / ``bridge_errors``: exception type names accepted,
    where the point is about an error (empty tuple: not an error point).
    """

    key: str
    what: str
    strict: str
    bridge: str
    strict_errors: tuple[str, ...] = ()
    bridge_errors: tuple[str, ...] = ()

    def accepted_errors(self, contract: str) -> tuple[str, ...]:
        return self.strict_errors if contract == "strict" else self.bridge_errors


STRICTER_THAN_BRIDGE: tuple[ContractPoint, ...] = (
    ContractPoint(
        "both_modes",
        "target_modules and exclude_modules both set",
        "ValueError",
        "AssertionError",
        ("ValueError",),
        ("AssertionError", "ValueError"),
    ),
    ContractPoint(
        "unknown_init",
        "unknown init method",
        "ValueError listing the names",
        "NotImplementedError",
        ("ValueError",),
        ("NotImplementedError", "ValueError"),
    ),
    ContractPoint(
        "init_methods",
        "init methods offered",
        "xavier, xavier_uniform, kaiming, normal, zero",
        "xavier, kaiming, normal, zero",
    ),
    ContractPoint(
        "non_linear_target",
        "pattern selecting a non-linear module",
        "TypeError naming module and type",
        "AttributeError or NotImplementedError from deep inside",
        ("TypeError",),
        ("TypeError", "AttributeError", "NotImplementedError"),
    ),
    ContractPoint(
        "init_tp_independent",
        "init at TP > 1",
        "over the full matrix, same for every layout",
        "fans on the shard: differs per TP size",
    ),
    ContractPoint(
        "lora_dtype_parallel",
        "lora_dtype on the parallel path",
        "honoured",
        "ignored",
    ),
    ContractPoint(
        "merge_cast_once",
        "LoRAMerge.merge precision",
        "float32, cast once to the base dtype",
        "in the weights' dtype: 16-bit weights round twice",
    ),
    ContractPoint(
        "merge_model_fold",
        "LoRAMerge as a model transform",
        "LoRAMerge()(model) folds every adapter",
        "a tensor helper only: merge(..., *, tp_group, scale=None)",
    ),
    ContractPoint(
        "idempotent",
        "applying the LoRA a second time",
        "changes nothing",
        "skips adapted modules, but adapts the adapters' own linears in exclude mode",
    ),
    ContractPoint(
        "rank_divisible",
        "a rank TP cannot split",
        "ValueError naming module, rank and TP",
        "AssertionError",
        ("ValueError",),
        ("AssertionError", "ValueError"),
    ),
    ContractPoint(
        "router_target",
        "pattern selecting the MoE router",
        "TypeError naming module and type",
        "adapts the router",
        ("TypeError",),
        ("TypeError", "AssertionError", "NotImplementedError"),
    ),
    ContractPoint(
        "unmatched_warns",
        "pattern that matches nothing",
        "a warning naming it",
        "silence",
    ),
    ContractPoint(
        "vlm_access_forms",
        "how VLMLoRA takes the model",
        "the model, [model], or a wrapper's .llava_model",
        "a list of chunks only",
    ),
)

_POINTS = {p.key: p for p in STRICTER_THAN_BRIDGE}


def contract_point(key: str) -> ContractPoint:
    return _POINTS[key]


_DTYPE_NAMES = (None, "float32", "float64", "bfloat16", "float16")
_FLAGS = ("experts", "grouped_experts", "sequence_parallel", "a2a", "vlm", "merge", "adapter_switch", "recompute",
          "checkpoint")


def _names_problem(value: Any, allowed: tuple, what: str) -> Optional[str]:
    names = ", ".join(map(str, allowed))
    if not isinstance(value, (list, tuple)):
        return f"must be a list of {what}s ({names}), not a {type(value).__name__}"
    if not value:
        return f"must list at least one {what} ({names})"
    bad = [v for v in value if not (v is None or isinstance(v, str)) or v not in allowed]
    if bad:
        return f"{', '.join(map(repr, bad))}: not {'an' if what[0] in 'aeiou' else 'a'} {what}; each must be one of {names}"
    return None


def _field_problem(name: str, value: Any) -> Optional[str]:
    """The rule a ``Capabilities`` field's value breaks, or None."""
    if name == "contract":
        if not isinstance(value, str) or value not in CONTRACTS:
            return f"must be one of {', '.join(CONTRACTS)}"
    elif name == "init_methods":
        return _names_problem(value, INIT_METHODS, "init method name")
    elif name == "lora_dtypes":
        return _names_problem(value, _DTYPE_NAMES, "adapter dtype name")
    elif name in _FLAGS:
        if not isinstance(value, bool):
            return f"must be True or False, not a {type(value).__name__}"
    return None


@dataclass(frozen=True)
class Capabilities:
    """What an implementation under test supports, and which contract it follows.

    The harness draws only inside these; ``skipped()`` lists what a full SPEC
    implementation would also have been checked on. ``lora_dtypes`` lists
    adapter dtype names (None = the base weight's dtype).
    """

    contract: str = "strict"
    init_methods: tuple[str, ...] = INIT_METHODS
    lora_dtypes: tuple[Optional[str], ...] = (None, "float32", "float64", "bfloat16", "float16")
    experts: bool = True
    grouped_experts: bool = True
    sequence_parallel: bool = True
    a2a: bool = True
    vlm: bool = True
    merge: bool = True
    adapter_switch: bool = True
    recompute: bool = True
    checkpoint: bool = True

    def __post_init__(self) -> None:
        for f in fields(self):
            problem = _field_problem(f.name, getattr(self, f.name))
            if problem:
                raise ValueError(f"Capabilities.{f.name}={getattr(self, f.name)!r}: {problem}")
        object.__setattr__(self, "init_methods", tuple(self.init_methods))
        object.__setattr__(self, "lora_dtypes", tuple(self.lora_dtypes))

    @classmethod
    def strict(cls, **changes: Any) -> "Capabilities":
        """Everything SPEC describes."""
        return replace(cls(), **changes)

    @classmethod
    def bridge(cls, **changes: Any) -> "Capabilities":
        """Megatron-Bridge 0.6.2's behaviour: its four init methods, lora_dtype ignored on the parallel path."""
        return replace(cls(contract="bridge", init_methods=BRIDGE_INIT_METHODS, lora_dtypes=(None,)), **changes)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], where: str = "capabilities") -> "Capabilities":
        """Capabilities from plain data (an implementation's ``LORA_HARNESS_CAPABILITIES``).

        Every key must be a field and every value of the field's type
        (booleans ``True``/``False``, lists of known names, a known contract);
        ``ValueError`` names ``where``, the key, the value and the rule.
        Fields left out take the declared contract's defaults.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"{where} must be a dict of Capabilities fields, got {type(data).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted((k for k in data if k not in known), key=repr)
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown}; known: {', '.join(known)}")
        for key in known:
            if key in data:
                problem = _field_problem(key, data[key])
                if problem:
                    raise ValueError(f"{where}[{key!r}] = {data[key]!r}: {problem}")
        base = cls.bridge() if data.get("contract") == "bridge" else cls()
        return replace(base, **dict(data))

    def with_contract(self, contract: str) -> "Capabilities":
        """The same support flags judged by another contract; ``bridge`` also draws only what Bridge accepts."""
        if contract == "bridge":
            return replace(
                self,
                contract="bridge",
                init_methods=tuple(m for m in self.init_methods if m in BRIDGE_INIT_METHODS) or BRIDGE_INIT_METHODS,
                lora_dtypes=(None,),
            )
        return replace(self, contract=contract)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def skipped(self) -> list[str]:
        """What the full SPEC would also check, and why it is not drawn here."""
        full = Capabilities()
        out = []
        missing_init = [m for m in full.init_methods if m not in self.init_methods]
        if missing_init:
            out.append(f"init methods {', '.join(missing_init)} (not offered by the implementation)")
        missing_dtypes = [str(d) for d in full.lora_dtypes if d not in self.lora_dtypes]
        if missing_dtypes:
            out.append(f"lora_dtype {', '.join(missing_dtypes)} (not supported)")
        for flag, what in (
            ("experts", "expert (MoE) adapters"),
            ("grouped_experts", "grouped experts (megatron's TEGroupedMLP; on CPU a torch grouped linear the "
                                "implementation does not recognise): MoE examples use SequentialMLP"),
            ("sequence_parallel", "sequence-parallel layouts"),
            ("a2a", "a2a_experimental"),
            ("vlm", "VLMLoRA"),
            ("merge", "LoRAMerge"),
            ("adapter_switch", "switching adapters off (enable_adapter_layers / disable_adapter_layers / disable_adapter)"),
            ("recompute", "training under megatron-core's activation recompute"),
            ("checkpoint", "adapter checkpoints (set_params_to_save / adapter_key_filter / sharded_state_dict)"),
        ):
            if not getattr(self, flag):
                out.append(f"{what} (not supported)")
        if self.contract == "bridge":
            out.append(
                "SPEC points stricter than Megatron-Bridge are advisory contract findings: "
                + "; ".join(p.what for p in STRICTER_THAN_BRIDGE)
            )
        return out

    def describe(self) -> str:
        return f"contract {self.contract}, init {'/'.join(self.init_methods)}, lora_dtype {'/'.join(map(str, self.lora_dtypes))}"


CAPABILITIES_ATTR = "LORA_HARNESS_CAPABILITIES"


def load_impl(module_name: str) -> Any:
    """Import an implementation under test and check it exposes SPEC's names.

    Raises ``ImplLoadError`` (one clear line) if the module does not import
    or lacks a name.
    """
    if not isinstance(module_name, str) or not module_name.strip():
        raise ImplLoadError(f"implementation {module_name!r}: give an importable module name, e.g. mypkg.lora")
    from harness import bridge

    try:
        # Megatron-Bridge's LoRA is recognised by name and imported on CPU by
        # harness.bridge (no Transformer Engine there), with its own classes.
        module = bridge.bridge_impl_module() if bridge.is_bridge(module_name) else importlib.import_module(module_name)
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - any import failure is one usage error
        where = ""
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        if tb is not None:
            where = f" ({tb.tb_frame.f_code.co_filename}:{tb.tb_lineno})"
        raise ImplLoadError(
            f"implementation {module_name!r} failed to import: {type(exc).__name__}: {exc}{where}"
        ) from exc
    missing = [n for n in REQUIRED_NAMES if not hasattr(module, n)]
    if missing:
        raise ImplLoadError(
            f"implementation {module_name!r} does not expose {', '.join(missing)} "
            f"(the LoRA API needs {', '.join(REQUIRED_NAMES)})"
        )
    for name in REQUIRED_NAMES:
        value = getattr(module, name)
        if not isinstance(value, type):
            raise ImplLoadError(
                f"implementation {module_name!r}: {module_name}.{name} must be a class (the harness calls "
                f"{name}(...) with SPEC's fields and uses its methods), but it is {reprlib.repr(value)}, of type {type(value).__name__}"
            )
    return module


def capabilities_of(module_name: str, override: Optional[Capabilities] = None) -> Capabilities:
    """``override`` if given, else the module's ``LORA_HARNESS_CAPABILITIES`` dict, else full SPEC.

    ``ImplLoadError`` (one line naming the module, the key, the value and the
    rule) for capabilities that are not a dict of valid fields.
    """
    if override is not None:
        if isinstance(override, Capabilities):
            return override
        if isinstance(override, Mapping):
            try:
                return Capabilities.from_mapping(override, f"capabilities for {module_name}")
            except ValueError as exc:
                raise ImplLoadError(str(exc)) from exc
        raise ImplLoadError(
            f"capabilities for {module_name} must be a harness.contract.Capabilities or a dict of its fields, "
            f"got {type(override).__name__}"
        )
    from harness import bridge

    module = (None if bridge.is_bridge(module_name) else sys.modules.get(module_name)) or load_impl(module_name)
    data = getattr(module, CAPABILITIES_ATTR, None)
    if data is None:
        return Capabilities()
    if isinstance(data, Capabilities):
        return data
    if not isinstance(data, Mapping):
        raise ImplLoadError(
            f"{module_name}.{CAPABILITIES_ATTR} must be a dict of Capabilities fields (or a Capabilities), "
            f"got {type(data).__name__}"
        )
    try:
        return Capabilities.from_mapping(data, f"{module_name}.{CAPABILITIES_ATTR}")
    except (TypeError, ValueError) as exc:
        raise ImplLoadError(str(exc)) from exc
