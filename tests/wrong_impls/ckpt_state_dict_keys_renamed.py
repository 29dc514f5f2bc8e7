"""Bug: an adapter's ``sharded_state_dict`` keys its A under a name that is not the parameter's
(``adapter.lin_in.weight`` for ``adapter.linear_in.weight``). The checkpoint's own entries are right, so the
save is fine and the load reads them, but ``load_state_dict(..., strict=False)`` drops the renamed keys as
unexpected: every A keeps the fresh model's values."""

import types

from tests.wrong_impls._base import LoRAMerge, VLMLoRA, patched_lora  # noqa: F401


def _patch(wrapper, full_name):
    original = wrapper.adapter.sharded_state_dict

    def renamed(self, prefix="", sharded_offsets=(), metadata=None):
        return {k.replace(".linear_in.", ".lin_in."): v for k, v in original(prefix, sharded_offsets, metadata).items()}

    wrapper.adapter.sharded_state_dict = types.MethodType(renamed, wrapper.adapter)


LoRA = patched_lora(_patch)
