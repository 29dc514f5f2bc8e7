"""The reference's adapter modules and the wrappers that add them to a base layer's output.

* `LoRAAdapter`: one adapter, (alpha / dim) * Dpost(B(A(Dpre(x)))), parameters
  `linear_in.weight` (A) and `linear_out.weight` (B);
* `LoRAExpertAdapters`: one adapter per expert of a grouped linear,
  parameters `linear_in.weight{i}` and `linear_out.weight{i}`;
* `LoRALinear`: a base linear (`to_wrap`) plus its `adapter`;
* `LoRAGroupedLinear`: a grouped expert linear (`to_wrap(x, m_splits)`) plus
  a shared `LoRAAdapter` or a `LoRAExpertAdapters`.

Both adapters draw their weights at construction (`lora.reference.init`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lora.reference.init import _draw_adapter_weights


class _Matrix(nn.Module):
    """A bias-free linear map held as one (out_features, in_features) `weight`."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, device: Any) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=dtype, device=device))
        self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, self.weight.T)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias=False"


class _ExpertMatrices(nn.Module):
    """One bias-free (out_features, in_features) matrix per expert, held as `weight0` .. `weight{n-1}`."""

    def __init__(self, num_experts: int, in_features: int, out_features: int, dtype: torch.dtype, device: Any) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.in_features = in_features
        self.out_features = out_features
        for i in range(num_experts):
            self.register_parameter(
                f"weight{i}", nn.Parameter(torch.zeros(out_features, in_features, dtype=dtype, device=device))
            )

    def weights(self) -> list[torch.Tensor]:
        return [getattr(self, f"weight{i}") for i in range(self.num_experts)]

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, in_features={self.in_features}, out_features={self.out_features}, bias=False"


class _AdapterBase(nn.Module):
    """What both adapters share: A (`linear_in`) and B (`linear_out`), dim, alpha, dropout and where it acts, the scale."""

    def __init__(
        self, linear_in: nn.Module, linear_out: nn.Module, dim: int, alpha: float, dropout: float, dropout_position: str
    ) -> None:
        super().__init__()
        self.linear_in = linear_in
        self.linear_out = linear_out
        self.dim = dim
        self.alpha = alpha
        self.dropout = dropout
        self.dropout_position = dropout_position

    @property
    def scale(self) -> float:
        return self.alpha / self.dim

    def _dropout_at(self, h: torch.Tensor, position: str) -> torch.Tensor:
        """Dropout on `h` when it acts at `position` ('pre' or 'post') and the adapter is training with dropout > 0."""
        if self.dropout_position == position and self.training and self.dropout > 0:
            h = F.dropout(h, p=self.dropout, training=True)
        return h

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, alpha={self.alpha}, dropout={self.dropout}, "
            f"dropout_position={self.dropout_position!r}"
        )


class LoRAAdapter(_AdapterBase):
    """The adapter branch: (alpha / dim) * Dpost(B(A(Dpre(x)))) in the adapter's dtype.

    `linear_in` is A (in -> dim), `linear_out` is B (dim -> out), neither with
    a bias. A is drawn first, then B, from torch's global generator, over
    their full shapes in float32 on the CPU.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        dim: int,
        *,
        alpha: float,
        dropout: float = 0.0,
        dropout_position: str = "pre",
        lora_A_init_method: str = "xavier",
        lora_B_init_method: str = "zero",
        dtype: torch.dtype = torch.float32,
        device: Any = None,
    ) -> None:
        super().__init__(
            _Matrix(in_features, dim, dtype, device),
            _Matrix(dim, out_features, dtype, device),
            dim,
            alpha,
            dropout,
            dropout_position,
        )
        _draw_adapter_weights([(self.linear_in.weight, self.linear_out.weight)], lora_A_init_method, lora_B_init_method)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        A = self.linear_in.weight
        B = self.linear_out.weight
        h = self._dropout_at(x.to(A.dtype), "pre")
        h = h @ A.T
        h = h @ B.T
        h = self._dropout_at(h, "post")
        return h * self.scale


class LoRAExpertAdapters(_AdapterBase):
    """One adapter per expert of a grouped linear: rows of expert i get (alpha/dim) * Dpost(B_i(A_i(Dpre(x_i)))).

    `linear_in.weight{i}` is A_i (dim, in), `linear_out.weight{i}` is B_i
    (out, dim). Drawn from torch's global generator over full shapes in
    float32 on the CPU, in the order A0, B0, A1, B1, ...
    Dropout ("pre" on the whole input, "post" on the whole result) acts on
    all rows at once, before the split by expert / after the concatenation.
    """

    def __init__(
        self,
        num_experts: int,
        in_features: int,
        out_features: int,
        dim: int,
        *,
        alpha: float,
        dropout: float = 0.0,
        dropout_position: str = "pre",
        lora_A_init_method: str = "xavier",
        lora_B_init_method: str = "zero",
        dtype: torch.dtype = torch.float32,
        device: Any = None,
    ) -> None:
        super().__init__(
            _ExpertMatrices(num_experts, in_features, dim, dtype, device),
            _ExpertMatrices(num_experts, dim, out_features, dtype, device),
            dim,
            alpha,
            dropout,
            dropout_position,
        )
        self.num_experts = num_experts
        _draw_adapter_weights(
            zip(self.linear_in.weights(), self.linear_out.weights()), lora_A_init_method, lora_B_init_method
        )

    def forward(self, x: torch.Tensor, splits: list[int]) -> torch.Tensor:
        """x: (tokens, in) with rows grouped by expert; splits: tokens per expert (ints summing to tokens)."""
        As = self.linear_in.weights()
        Bs = self.linear_out.weights()
        h = self._dropout_at(x.to(As[0].dtype), "pre")
        outs = []
        start = 0
        for i, count in enumerate(splits):
            block = h[start : start + count]
            outs.append((block @ As[i].T) @ Bs[i].T)
            start += count
        h = torch.cat(outs, dim=0)
        h = self._dropout_at(h, "post")
        return h * self.scale

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, " + super().extra_repr()


def _add_to_output(base_out: Any, delta: torch.Tensor) -> Any:
    """base output + delta (cast to the output's dtype); an `(output, bias, ...)` tuple keeps its shape."""
    if isinstance(base_out, tuple):
        out = base_out[0]
        return (out + delta.to(out.dtype),) + tuple(base_out[1:])
    return base_out + delta.to(base_out.dtype)


class LoRALinear(nn.Module):
    """A base linear (`to_wrap`) plus its `LoRAAdapter` (`adapter`): base(x) + adapter(x).

    A base returning `(output, bias, ...)` keeps that tuple, with the adapter
    added to `output`. Attributes the wrapper lacks are read from the base.
    """

    def __init__(self, to_wrap: nn.Module, adapter: LoRAAdapter) -> None:
        super().__init__()
        self.to_wrap = to_wrap
        self.adapter = adapter
        self.disabled = False  # set by LoRA.disable_adapter_layers: base output only

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        base_out = self.to_wrap(x, *args, **kwargs)
        if self.disabled:
            return base_out
        return _add_to_output(base_out, self.adapter(x))

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("_modules", {}).get("to_wrap")
            if base is None:
                raise
        if hasattr(base, name):
            return getattr(base, name)
        raise AttributeError(
            f"'{type(self).__name__}' object (wrapping {type(base).__name__}) has no attribute '{name}'"
        )


def _split_sizes(m_splits: Any, num_experts: int, rows: int, where: str) -> list[int]:
    """m_splits (list of ints or 1-D tensor) as a list of ints, checked against the expert count and the rows of x."""
    if torch.is_tensor(m_splits):
        splits = [int(v) for v in m_splits.reshape(-1).tolist()]
    else:
        splits = [int(v) for v in m_splits]
    if len(splits) != num_experts:
        raise ValueError(f"{where}: m_splits has {len(splits)} entries for {num_experts} experts")
    if any(v < 0 for v in splits) or sum(splits) != rows:
        raise ValueError(f"{where}: m_splits {splits} must be non-negative and sum to the {rows} rows of x")
    return splits


class LoRAGroupedLinear(LoRALinear):
    """A grouped expert linear (`to_wrap`, called as `to_wrap(x, m_splits)`) plus its adapter(s).

    `adapter` is a `LoRAAdapter` shared by every expert (applied to all rows
    of x) or a `LoRAExpertAdapters` (expert i's adapter on expert i's rows).
    The base's `(output, bias)` tuple is kept, the adapter added to `output`.
    """

    def forward(self, x: torch.Tensor, m_splits: Any, *args: Any, **kwargs: Any) -> Any:
        base_out = self.to_wrap(x, m_splits, *args, **kwargs)
        if self.disabled:
            return base_out
        if isinstance(self.adapter, LoRAExpertAdapters):
            splits = _split_sizes(m_splits, self.adapter.num_experts, x.shape[0], type(self).__name__)
            delta = self.adapter(x, splits)
        else:
            delta = self.adapter(x)
        return _add_to_output(base_out, delta)


def _is_wrapper(module: Any) -> bool:
    return isinstance(module, LoRALinear)
