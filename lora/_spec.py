"""harness/SPEC.md's constants, as plain data: both LoRA implementations may import this module.

Nothing here has behaviour (no functions, no classes): `lora.reference` and
`lora.megatron` each implement matching, init, freezing and merging on their
own, so that the oracle and the implementation under test can disagree.
"""

# Default `target_modules` (a fresh list must be copied from this per config).
DEFAULT_TARGET_MODULES = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")

# Valid `lora_A_init_method` / `lora_B_init_method` names, in SPEC order.
INIT_METHODS = ("xavier", "xavier_uniform", "kaiming", "normal", "zero")

# Valid `dropout_position` values.
DROPOUT_POSITIONS = ("pre", "post")

# Every LoRA config field of the SPEC with its default (target_modules and
# exclude_modules are lists in the dataclasses; copy them).
FIELD_DEFAULTS = {
    "target_modules": DEFAULT_TARGET_MODULES,
    "exclude_modules": (),
    "dim": 32,
    "alpha": 32,
    "dropout": 0.0,
    "dropout_position": "pre",
    "a2a_experimental": False,
    "lora_A_init_method": "xavier",
    "lora_B_init_method": "zero",
    "lora_dtype": None,
    "normalize_moe_lora": False,
    "share_expert_adapters": True,
}

# VLMLoRA's extra fields and their defaults.
VLM_FIELD_DEFAULTS = {
    "freeze_vision_model": True,
    "freeze_vision_projection": True,
    "freeze_language_model": True,
}

# The three VLM subtrees, in the order VLMLoRA's freeze flags name them.
VLM_PARTS = ("vision_model", "vision_projection", "language_model")

# Transformer Engine linears, recognised by class name anywhere in the MRO so
# that TE never has to be imported. The megatron-core TE wrappers (TE*) count
# wherever they live...
TE_LINEAR_CLASS_NAMES = frozenset(
    {
        "TELinear",
        "TEColumnParallelLinear",
        "TERowParallelLinear",
        "TELayerNormColumnParallelLinear",
        "TEColumnParallelGroupedLinear",
        "TERowParallelGroupedLinear",
        "TEGroupedLinear",
    }
)
# ...TE's own generic names only when the class's module starts with this prefix.
TE_OWN_LINEAR_CLASS_NAMES = frozenset({"Linear", "LayerNormLinear", "GroupedLinear"})
TE_MODULE_PREFIX = "transformer_engine"

# Where megatron-core's ColumnParallelLinear / RowParallelLinear live.
MEGATRON_LAYERS_MODULE = "megatron.core.tensor_parallel.layers"

# Standard deviation of init method "normal": Normal(0, 0.2).
NORMAL_INIT_STD = 0.2
