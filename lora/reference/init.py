"""How the reference draws adapter weights (SPEC "Initialisation"): each matrix over its full shape, float32 on the CPU, from torch's global generator.

`_draw_matrix` is one matrix; `_draw_adapter_weights` fills an adapter's
(A, B) parameter pairs in order, A then B for each pair, which is the order
the SPEC gives (one module at a time in walk order; per expert, A0, B0, A1,
B1, ...).
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

from lora import _spec


def _draw_matrix(rows: int, cols: int, method: str) -> torch.Tensor:
    """A (rows, cols) = (fan_out, fan_in) float32 CPU matrix drawn from torch's global generator.

    The formulas (and the floating-point order of their terms) are those of
    torch.nn.init, so the same seed gives bit-identical matrices:
      xavier         Normal(0, sqrt(2 / (fan_in + fan_out)))
      xavier_uniform Uniform(-a, a), a = sqrt(3) * sqrt(2 / (fan_in + fan_out))
      kaiming        Uniform(-b, b), b = sqrt(3) * gain / sqrt(fan_in), gain = sqrt(2 / (1 + 5))  (a = sqrt 5)
      normal         Normal(0, 0.2)
      zero           zeros, draws nothing
    """
    if method not in _spec.INIT_METHODS:
        raise ValueError(f"unknown init method {method!r}; valid names are: {', '.join(_spec.INIT_METHODS)}")
    matrix = torch.zeros(rows, cols, dtype=torch.float32, device="cpu")
    if rows == 0 or cols == 0 or method == "zero":
        return matrix
    fan_out, fan_in = rows, cols
    if method == "xavier":
        std = 1.0 * math.sqrt(2.0 / float(fan_in + fan_out))
        matrix.normal_(0.0, std)
    elif method == "xavier_uniform":
        std = 1.0 * math.sqrt(2.0 / float(fan_in + fan_out))
        bound = math.sqrt(3.0) * std
        matrix.uniform_(-bound, bound)
    elif method == "kaiming":
        negative_slope = math.sqrt(5)
        gain = math.sqrt(2.0 / (1 + negative_slope**2))
        std = gain / math.sqrt(fan_in)
        bound = math.sqrt(3.0) * std
        matrix.uniform_(-bound, bound)
    elif method == "normal":
        matrix.normal_(0.0, _spec.NORMAL_INIT_STD)
    return matrix


def _draw_adapter_weights(
    pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], a_method: str, b_method: str
) -> None:
    """Fill each (A, B) parameter pair, in order: A drawn over A's shape, then B over B's, each cast to its parameter's dtype."""
    for A_param, B_param in pairs:
        A = _draw_matrix(A_param.shape[0], A_param.shape[1], a_method)
        B = _draw_matrix(B_param.shape[0], B_param.shape[1], b_method)
        with torch.no_grad():
            A_param.copy_(A.to(A_param.dtype))
            B_param.copy_(B.to(B_param.dtype))
