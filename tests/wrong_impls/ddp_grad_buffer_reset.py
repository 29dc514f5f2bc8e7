"""Bug: the adapter zeroes its gradient buffer (megatron DDP's ``main_grad``) at every forward, as if a
step had one forward pass: under megatron-core's DDP, gradient accumulation over micro-batches keeps only
the last micro-batch's gradient (the bare harness, which reads ``.grad`` after one backward, cannot see it)."""

from tests.wrong_impls._base import LoRAMerge, VLMLoRA, patched_lora  # noqa: F401


def _reset(module, args):
    for p in module.parameters():
        buffer = getattr(p, "main_grad", None)
        if buffer is not None:
            buffer.zero_()


def _patch(wrapper, full_name):
    wrapper.adapter.register_forward_pre_hook(_reset)


LoRA = patched_lora(_patch)
