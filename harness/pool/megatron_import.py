"""Import megatron-core with ``torch.compile``'s own imports deferred to a compiled function's first call.

Its one job: megatron-core's import in the fork server, made cheaper without changing what runs.
Rank processes start from a fork server that imports megatron-core once
(``harness.runs``'s preload names this module in its place). megatron-core
decorates its fused kernels with ``torch.compile`` at import
(``megatron.core.jit.jit_fuser``), and ``torch.compile(fn)`` imports
TorchDynamo and Inductor on the spot, although it compiles nothing until
``fn`` is called: on the 2-core machine that is 2.5 of megatron-core's 4 s
of import, paid by every run before its first example. The harness's
models turn every fusion off, so on CPU none of those functions is called.

While megatron-core is imported here, ``torch.compile(fn, **options)``
returns a function that makes the real ``torch.compile(fn, **options)`` at
its first call and calls that from then on: what runs is what would have
run, the imports come only when a compiled function is used. The real
``torch.compile`` is put back afterwards, so later callers (an
implementation under test, megatron modules imported later) get it as is;
``megatron.core.jit.jit_fuser`` keeps the deferring one.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch

__all__ = ["deferred_compile"]


def deferred_compile(real: Callable[..., Any]) -> Callable[..., Any]:
    """A ``torch.compile`` that calls ``real`` (with the same arguments) when the compiled function is first called."""

    def compile(model: Any = None, **options: Any) -> Any:
        if model is None:  # used as @torch.compile(mode=...): a decorator
            return lambda fn: compile(fn, **options)
        if not callable(model) or isinstance(model, torch.nn.Module):
            return real(model, **options)  # a module is compiled as asked (megatron compiles only functions here)
        made: list[Callable[..., Any]] = []

        @functools.wraps(model)
        def call(*args: Any, **kwargs: Any) -> Any:
            if not made:
                made.append(real(model, **options))
            return made[0](*args, **kwargs)

        return call

    return compile


_real = torch.compile
torch.compile = deferred_compile(_real)
try:
    import megatron.core  # noqa: F401,E402
finally:
    torch.compile = _real
