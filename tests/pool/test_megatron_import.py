"""The fork server's megatron-core import defers torch.compile's imports to a compiled function's first call."""

import subprocess
import sys

import torch

from harness.pool.megatron_import import deferred_compile


def test_deferred_compile_makes_the_real_one_at_the_first_call_with_the_same_options():
    made = []

    def real(fn, **options):
        made.append((fn, options))
        return lambda *a, **k: ("compiled", fn(*a, **k))

    compile = deferred_compile(real)

    def double(x, scale=1):
        return 2 * x * scale

    lazy = compile(double, dynamic=False)
    assert made == [] and lazy.__name__ == "double"
    assert lazy(3, scale=2) == ("compiled", 12)
    assert lazy(1) == ("compiled", 2)
    assert made == [(double, {"dynamic": False})]  # made once, with the options given

    @compile(mode="max-autotune")  # the decorator form
    def square(x):
        return x * x

    assert square(4) == ("compiled", 16) and made[-1] == (square.__wrapped__, {"mode": "max-autotune"})


def test_deferred_compile_leaves_modules_to_the_real_one():
    calls = []
    module = torch.nn.Linear(2, 2)
    assert deferred_compile(lambda m, **o: calls.append(m) or "real")(module) == "real" and calls == [module]


def test_megatron_imports_without_dynamo_and_torch_compile_is_restored():
    code = (
        "import sys, torch; real = torch.compile; import harness.pool.megatron_import; import megatron.core.jit as jit; "
        "assert 'megatron.core' in sys.modules; "
        "assert 'torch._dynamo' not in sys.modules and 'torch._inductor' not in sys.modules, 'dynamo imported'; "
        "assert torch.compile is real, 'torch.compile not restored'; "
        "assert jit.jit_fuser is not real, jit.jit_fuser; "
        "from megatron.core.fusions.fused_bias_swiglu import swiglu; "
        "y = torch.arange(8.0).reshape(2, 4); g, u = y.chunk(2, -1); "
        "assert torch.equal(swiglu.__wrapped__(y), torch.nn.functional.silu(g) * u); print('ok')"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout[-2000:] + run.stderr[-3000:]
