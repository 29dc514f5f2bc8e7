"""Bug: the QKV adapter emits its output rows in blocked q|k|v order instead of megatron's
per-query-group interleave ([q heads of group 0, k0, v0, q heads of group 1, k1, v1, ...]).

Identical when a rank holds one query group; wrong as soon as it holds several.
"""

import types

import torch

from tests.wrong_impls._base import LoRAMerge, VLMLoRA, patched_lora  # noqa: F401


def _blocked(out, config, tp):
    groups = config.num_query_groups // tp
    q_per_group = config.num_attention_heads // config.num_query_groups
    d = config.kv_channels
    grouped = out.reshape(*out.shape[:-1], groups, q_per_group + 2, d)
    q = grouped[..., :q_per_group, :].flatten(-3)
    k = grouped[..., q_per_group, :].flatten(-2)
    v = grouped[..., q_per_group + 1, :].flatten(-2)
    return torch.cat([q, k, v], dim=-1)


def _patch(wrapper, full_name):
    if not full_name.endswith("linear_qkv"):
        return
    adapter = wrapper.adapter
    forward = adapter.forward
    config = wrapper.to_wrap.config

    def blocked_forward(self, x):
        return _blocked(forward(x), config, self.tp_size)

    adapter.forward = types.MethodType(blocked_forward, adapter)


LoRA = patched_lora(_patch)
