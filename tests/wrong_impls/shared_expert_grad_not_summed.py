"""Bug: a grouped linear's shared adapter keeps its local gradient (not summed over the EP group).

Each EP rank then trains the shared adapter on its own experts' tokens only,
and the copies drift apart.
"""

from torch import nn

from tests.wrong_impls._experts import LORA_HARNESS_CAPABILITIES, LoRAMerge, VLMLoRA, patched_expert_lora  # noqa: F401


def _patch(wrapper, full_name):
    adapter = wrapper.adapter
    if adapter.per_expert:
        return
    for weights in (adapter.linear_in, adapter.linear_out):
        for key, p in list(weights._parameters.items()):
            # A fresh Parameter carries none of the gradient hooks.
            weights._parameters[key] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)


LoRA = patched_expert_lora(_patch)
