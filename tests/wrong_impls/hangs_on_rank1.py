"""Bug: TP rank 1 never returns from linear_fc2's adapter (a deadlock, as when one rank skips a collective)."""

import threading
import types

from tests.wrong_impls._base import LoRAMerge, VLMLoRA, patched_lora  # noqa: F401


def _patch(wrapper, full_name):
    adapter = wrapper.adapter
    if adapter.tp_rank == 1 and full_name.endswith("linear_fc2"):

        def wait_forever_in_fc2_adapter(self, x):
            threading.Event().wait()

        adapter.forward = types.MethodType(wait_forever_in_fc2_adapter, adapter)


LoRA = patched_lora(_patch)
