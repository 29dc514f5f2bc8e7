"""Dropout the harness can reason about exactly: value-keyed masks, and captured real masks.

A dropout mask drawn from an RNG differs between a sharded run and the
single-device reference by nature, so comparing their outputs in training
mode would need statistics. Instead every rank task (the implementation's
and the reference's) runs inside ``keyed_dropout()``, which replaces
``torch.nn.functional.dropout`` (what ``nn.Dropout``, Megatron-Bridge's
adapters and ours call) by inverted dropout whose mask is a fixed function
of each element's *value*: an element is kept when a hash of its value's
*cell* is at least ``p`` (the cell: sign, exponent and the first
``KEY_MANTISSA_BITS`` bits of the mantissa, i.e. the value truncated to a
grid of relative spacing 2**-16). The same value gets the same
decision on every rank and in the reference, wherever it sits, so a
sharded run whose adapter drops the right tensor (the adapter input for
``pre``, the adapter output for ``post``) computes exactly what the
single-device reference computes with that mask; one that drops the base
path, drops in eval, or drops the wrong tensor does not. The equivalence
properties then compare training-mode dropout like everything else.

Values that differ between layouts only by summation order must fall in
the same cell to get the same decision, so the strategies draw
training-mode dropout with float64 models and adapters only. A float64
value a few ulps from a cell boundary can still land on the other side in
another layout (a deep run found one: grouped experts, post dropout, float64;
the old float32-rounding key had boundaries 256 times closer). So every
dropping call also counts its *fragile* elements: non-zero values within
``FRAGILE_MARGIN`` times the call's largest magnitude of a cell boundary,
far more than float64 summation order moves a value (about 1e-14 of it)
and rare by design (about 2**-23 of an element's cell width per unit of
max/|x|: some 1e-3 of training-dropout examples). A comparison that fails
on an example with a fragile element is undecidable there
(``harness.properties._gather.Numeric``), never charged: its masks may
differ by rounding alone.

``capture_dropout()`` does the opposite: it leaves the real dropout in
place and records, per call, a fingerprint of the input and of the mask
the implementation drew, so a rank can check the rule that a tensor
replicated across TP ranks gets the same mask on every rank.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

__all__ = ["keyed_mask", "fragile_mask", "keyed_dropout", "capture_dropout", "DropoutLog", "KEY_MANTISSA_BITS", "FRAGILE_MARGIN"]

_MIX = 0x45D9F3B  # a 27-bit odd multiplier: products of 31-bit values stay inside int64
#: Mantissa bits a value's cell keeps (the rest decide nothing).
KEY_MANTISSA_BITS = 16
#: A non-zero value closer than this times the call's max|x| to a cell boundary is fragile.
FRAGILE_MARGIN = 2.0 ** -40


def _cells(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x as float64, its cell key as int64 in [0, 2**31), the distance from x to its cell's nearer boundary)."""
    v = x.detach().to(torch.float64)
    v = torch.where(torch.isfinite(v), v, torch.zeros_like(v))
    m, e = torch.frexp(v.abs())  # |v| = m * 2**e, m in [0.5, 1) (0 for 0)
    scaled = m * float(2 ** (KEY_MANTISSA_BITS + 1))  # [2**16, 2**17): one unit is one cell
    cell = torch.floor(scaled)
    frac = scaled - cell
    distance = torch.minimum(frac, 1.0 - frac) * torch.ldexp(torch.ones_like(v), e.to(torch.int64) - (KEY_MANTISSA_BITS + 1))
    low = (cell.to(torch.int64) - (1 << KEY_MANTISSA_BITS)).clamp(min=0)
    key = ((e.to(torch.int64) + 1100) * 2 + (v < 0).to(torch.int64)) * (1 << KEY_MANTISSA_BITS) + low + 1
    key = torch.where(v == 0, torch.zeros_like(key), key)
    return v, key, distance


def _keep(key: torch.Tensor, p: float) -> torch.Tensor:
    h = key & 0x7FFFFFFF
    for _ in range(2):
        h = ((h >> 16) ^ h) * _MIX & 0xFFFFFFFF
        h &= 0x7FFFFFFF
    h = (h >> 16) ^ h
    return (h & 0xFFFFFF).to(torch.float64) / float(1 << 24) >= p


def _fragile(v: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
    scale = float(v.abs().max()) if v.numel() else 0.0
    return (v != 0) & (distance < FRAGILE_MARGIN * scale)


def keyed_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """The keep mask (bool, x's shape): True where hash(cell of x) / 2**24 >= p."""
    return _keep(_cells(x)[1], p)


def fragile_mask(x: torch.Tensor) -> torch.Tensor:
    """Where x's decision could flip under a float64 rounding difference: non-zero, within
    ``FRAGILE_MARGIN * max|x|`` of a cell boundary."""
    v, _, distance = _cells(x)
    return _fragile(v, distance)


@dataclass
class DropoutLog:
    """What dropout did inside one ``keyed_dropout`` / ``capture_dropout`` block."""

    calls: int = 0            # calls with p > 0 that dropped (training=True)
    elements: int = 0         # elements those calls saw
    dropped: int = 0          # elements zeroed by those calls
    eval_calls: int = 0       # calls with p > 0 and training=True made while the model was in eval mode
    fragile: int = 0          # elements whose keyed decision a rounding difference could flip (fragile_mask)
    records: list[tuple[tuple[int, ...], str, str]] = field(default_factory=list)  # (shape, input digest, mask digest)


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha1(t.detach().contiguous().cpu().numpy().tobytes()).hexdigest()[:16]


@contextlib.contextmanager
def keyed_dropout(model: Any = None) -> Iterator[DropoutLog]:
    """Dropout uses value-keyed masks inside the block.

    Patched where every PyTorch dropout path ends: ``torch._VF.dropout`` /
    ``dropout_`` (what ``torch.nn.functional.dropout`` calls at each call, so
    ``nn.Dropout`` and a ``from torch.nn.functional import dropout`` made
    before the block are covered) and ``torch.dropout``. ``model``: when
    given, a dropping call made while ``model.training`` is False counts in
    ``eval_calls`` (SPEC: dropout acts only in training).
    """
    log = DropoutLog()

    def dropout(input: torch.Tensor, p: float, train: bool) -> torch.Tensor:
        if not train or p == 0.0:
            return input
        if model is not None and not model.training:
            log.eval_calls += 1
        v, key, distance = _cells(input)  # once per call: the mask and its fragile elements
        keep = _keep(key, p)
        log.fragile += int(_fragile(v, distance).sum())
        log.calls += 1
        log.elements += input.numel()
        log.dropped += int((~keep).sum())
        return input * keep.to(input.dtype) / (1.0 - p)

    def dropout_(input: torch.Tensor, p: float, train: bool) -> torch.Tensor:
        out = dropout(input, p, train)
        return input if out is input else input.copy_(out)

    with _patched(dropout, dropout_):
        yield log


@contextlib.contextmanager
def capture_dropout() -> Iterator[DropoutLog]:
    """The real dropout, with each dropping call's (shape, input digest, mask digest) recorded."""
    log = DropoutLog()
    real = torch._VF.dropout

    def dropout(input: torch.Tensor, p: float, train: bool) -> torch.Tensor:
        if not train or p == 0.0:
            return real(input, p, train)
        before = input.detach().clone()
        out = real(input, p, train)
        mask = (out.detach() == 0) & (before != 0)
        log.calls += 1
        log.elements += before.numel()
        log.dropped += int(mask.sum())
        log.records.append((tuple(before.shape), _digest(before), _digest(mask)))
        return out

    def dropout_(input: torch.Tensor, p: float, train: bool) -> torch.Tensor:
        return input.copy_(dropout(input, p, train))

    with _patched(dropout, dropout_):
        yield log


@contextlib.contextmanager
def _patched(dropout: Any, dropout_: Any) -> Iterator[None]:
    vf = torch._VF
    had = {name: name in vars(vf) for name in ("dropout", "dropout_")}
    old = {name: vars(vf).get(name) for name in had}
    real_torch = torch.dropout
    vf.dropout, vf.dropout_ = dropout, dropout_
    torch.dropout = dropout
    try:
        yield
    finally:
        for name, present in had.items():
            if present:
                setattr(vf, name, old[name])
            else:
                delattr(vf, name)
        torch.dropout = real_torch
