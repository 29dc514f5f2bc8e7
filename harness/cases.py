"""Typed cases: one drawn example per model family, with layout and dtypes carried as values.

A case is everything a rank needs to rebuild the same example: the model
shape, the LoRA keyword arguments, the seed, the layout, the dtypes, the
implementation and the contract it is judged by. Cases round-trip through
plain JSON (``to_json`` / ``case_from_json``), which is how failing examples
are stored under a regressions directory and replayed on every later run.

Each model family defines its case type in its folder
(``harness.families.<name>.case``; the dense ``GPTCase`` is the base of the
others); this module holds what every case shares: dtypes, the JSON schema
of a case and its checks, and ``case_from_json`` for any registered family.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import torch

from harness.layouts import ParallelLayout
from harness.errors import CaseError

__all__ = ["CaseError", "case_from_json", "check_case_json", "dtype_name", "parse_dtype", "shape_problem", "CASE_FIELDS"]

_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def dtype_name(dtype: Optional[torch.dtype]) -> Optional[str]:
    """``torch.float32`` -> ``"float32"``; None stays None."""
    if dtype is None:
        return None
    return str(dtype).replace("torch.", "")


def parse_dtype(value: Any) -> Optional[torch.dtype]:
    """A dtype value from a name (``"float32"``, ``"torch.float32"``), a dtype, or None."""
    if value is None or isinstance(value, torch.dtype):
        return value
    name = str(value).replace("torch.", "")
    if name not in _DTYPES:
        raise ValueError(f"dtype {value!r} is not one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


#: Top-level fields of a case's JSON (``to_json``); the first five are required.
CASE_FIELDS = ("family", "shape", "lora", "seed", "layout", "impl", "training", "model_dtype", "lora_dtype",
               "contract", "micro_batches", "value_grid", "loop", "load_layout")
_REQUIRED_FIELDS = CASE_FIELDS[:5]
#: Seeds are 0 <= seed < 2**32 (what hypothesis draws is far below; torch and megatron accept these).
_SEED_LIMIT = 2**32


def _shape_class(family: str) -> type:
    from harness.families import get_family

    return get_family(family).shape_type


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    import math

    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def shape_problem(cls: type, shape: Mapping[str, Any], where: str) -> Optional[str]:
    """The first field of a shape dict that is unknown or of the wrong type or size, as a message; or None."""
    kinds = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    unknown = [k for k in shape if k not in kinds]
    if unknown:
        return f"case field {where}.{unknown[0]!s}: not a field of {cls.__name__} (fields: {', '.join(kinds)})"
    for name, value in shape.items():
        kind = kinds[name]
        field_name = f"case field {where}.{name} = {value!r}"
        if kind == "bool":
            if not isinstance(value, bool):
                return f"{field_name}: must be true or false"
        elif kind == "str":
            if not isinstance(value, str):
                return f"{field_name}: must be a string"
        elif kind in ("int", "Optional[int]"):
            if value is None and kind == "Optional[int]":
                continue
            if not _is_int(value) or value < 1:
                optional = " (or null)" if kind == "Optional[int]" else ""
                return f"{field_name}: must be an integer >= 1{optional} (a size)"
    return None


def _lora_problem(lora: Mapping[str, Any]) -> Optional[str]:
    from harness.contract import DROPOUT_POSITIONS, INIT_METHODS, LORA_FIELDS

    for name, value in lora.items():
        field_name = f"case field lora.{name} = {value!r}"
        if name == "lora_dtype":
            return f"{field_name}: lora_dtype is the case's own field 'lora_dtype', not a LoRA keyword here"
        if name not in LORA_FIELDS:
            return f"case field lora.{name}: not a LoRA field (fields: {', '.join(k for k in LORA_FIELDS if k != 'lora_dtype')})"
        if name in ("target_modules", "exclude_modules"):
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                return f"{field_name}: must be a list of module name patterns (strings)"
        elif name == "dim":
            if not _is_int(value) or value < 1:
                return f"{field_name}: must be an integer >= 1"
        elif name == "alpha":
            if not _is_number(value):
                return f"{field_name}: must be a finite number"
        elif name == "dropout":
            if not _is_number(value) or not 0 <= value < 1:
                return f"{field_name}: must be a number from 0 up to (not including) 1"
        elif name == "dropout_position":
            if value not in DROPOUT_POSITIONS:
                return f"{field_name}: must be one of {', '.join(DROPOUT_POSITIONS)}"
        elif name in ("lora_A_init_method", "lora_B_init_method"):
            if not isinstance(value, str) or value not in INIT_METHODS:
                return f"{field_name}: must be one of {', '.join(INIT_METHODS)}"
        elif isinstance(LORA_FIELDS[name], bool):
            if not isinstance(value, bool):
                return f"{field_name}: must be true or false"
    return None


def _dtype_problem(name: str, value: Any, optional: bool) -> Optional[str]:
    if value is None and optional:
        return None
    if not isinstance(value, str) or value.replace("torch.", "") not in _DTYPES:
        return f"case field {name} = {value!r}: must be one of {', '.join(_DTYPES)}" + (" or null" if optional else "")
    return None


def check_case_json(data: Any) -> None:
    """Raise ``ValueError`` naming the first missing or bad field of a case's JSON (``to_json``'s form)."""
    from harness.contract import CONTRACTS

    if not isinstance(data, Mapping):
        kind = "a list" if isinstance(data, list) else f"a {type(data).__name__}"
        raise ValueError(f"a case must be a JSON object with fields {', '.join(_REQUIRED_FIELDS)}, ..., not {kind}")
    missing = [k for k in _REQUIRED_FIELDS if k not in data]
    if missing:
        raise ValueError(f"case field {missing[0]!r} is missing (a case needs {', '.join(_REQUIRED_FIELDS)})")
    unknown = [k for k in data if k not in CASE_FIELDS]
    if unknown:
        raise ValueError(f"case field {unknown[0]!r}: not a case field (fields: {', '.join(CASE_FIELDS)})")
    family = data["family"]
    from harness.families import family_names

    if not isinstance(family, str) or family not in family_names():
        raise ValueError(f"case field family = {family!r}: must be one of {', '.join(family_names())}")
    problems = []
    if not isinstance(data["shape"], Mapping):
        problems.append(f"case field shape = {data['shape']!r}: must be an object of {_shape_class(family).__name__} fields")
    else:
        problems.append(shape_problem(_shape_class(family), data["shape"], "shape"))
    if not isinstance(data["lora"], Mapping):
        problems.append(f"case field lora = {data['lora']!r}: must be an object of LoRA keyword arguments")
    else:
        problems.append(_lora_problem(data["lora"]))
    seed = data["seed"]
    if not _is_int(seed) or not 0 <= seed < _SEED_LIMIT:
        problems.append(f"case field seed = {seed!r}: must be an integer from 0 to {_SEED_LIMIT - 1}")
    layout = data["layout"]
    if not isinstance(layout, str):
        problems.append(f"case field layout = {layout!r}: must be a layout name such as 'tp2-ep1-etp2-pp1'")
    else:
        try:
            ParallelLayout.parse(layout)
        except ValueError as exc:
            problems.append(f"case field layout: {exc}")
    impl = data.get("impl", "lora.megatron")
    if not isinstance(impl, str) or not impl.strip():
        problems.append(f"case field impl = {impl!r}: must be a module name such as 'lora.megatron'")
    if not isinstance(data.get("training", True), bool):
        problems.append(f"case field training = {data['training']!r}: must be true or false")
    problems.append(_dtype_problem("model_dtype", data.get("model_dtype", "float32"), optional=False))
    problems.append(_dtype_problem("lora_dtype", data.get("lora_dtype"), optional=True))
    contract = data.get("contract", "strict")
    if not isinstance(contract, str) or contract not in CONTRACTS:
        problems.append(f"case field contract = {contract!r}: must be one of {', '.join(CONTRACTS)}")
    micro = data.get("micro_batches", 1)
    if not _is_int(micro) or micro < 1:
        problems.append(f"case field micro_batches = {micro!r}: must be an integer >= 1")
    grid = data.get("value_grid")
    if grid is not None:
        if not isinstance(grid, (list, tuple)) or len(grid) != 2:
            problems.append(f"case field value_grid = {grid!r}: must be null or [model dtype, adapter dtype]")
        else:
            problems += [_dtype_problem(f"value_grid[{i}]", g, optional=False) for i, g in enumerate(grid)]
    if data.get("loop") is not None:
        from harness.training import loop_problem

        problems.append(loop_problem(data["loop"]))
    load = data.get("load_layout")
    if load is not None:
        rule = f"case field load_layout = {load!r}: must be null or a layout name such as 'tp2-ep1'"
        if not isinstance(load, str):
            problems.append(rule)
        else:
            try:
                ParallelLayout.parse(load)
            except ValueError as exc:
                problems.append(f"{rule} ({exc})")
    problems = [p for p in problems if p]
    if problems:
        raise ValueError(problems[0])


def case_from_json(data: Mapping[str, Any]) -> Any:
    """The case a ``to_json`` dict describes, for any registered family.

    Raises ``ValueError`` naming the first missing or bad field (its value
    and the rule) before anything is built; the result still has to fit its
    layout (``validate()``).
    """
    check_case_json(data)
    try:
        from harness.families import get_family

        return get_family(data["family"]).case_type.from_json(data)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"case: {exc}") from None


_MOVED = {"GPTCase": "harness.families.gpt.case", "MoECase": "harness.families.moe.case", "VLMCase": "harness.families.vlm.case"}


def __getattr__(name: str) -> Any:
    """The case types, which live in their families' folders (``from harness.cases import GPTCase`` still works)."""
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module 'harness.cases' has no attribute {name!r}")
