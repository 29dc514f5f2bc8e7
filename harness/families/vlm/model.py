"""A tiny real megatron-core vision-language model (LLaVA), and what SPEC says VLMLoRA must do to it.

``VLMShape`` is a ``GPTShape`` (the language model) plus the vision tower
and the projection; ``build_vlm`` builds megatron-core 0.19.2's own
``LLaVAModel`` (``megatron.core.models.multimodal.llava_model``) with local
(non-Transformer-Engine) layer specs for whatever ``parallel_state``
currently says: a ``CLIPViTModel`` vision tower (``vision_model``), a
two-layer MLP ``MultimodalProjector`` (``vision_projection``) and a
``GPTModel`` (``language_model``).

What it takes to run LLaVA on CPU (megatron-core 0.19.2, no Transformer
Engine, no apex):

* ``CLIPViTModel.__init__`` puts its position ids on the GPU with
  ``torch.arange(...).cuda()``, a tensor method that the scoped CUDA
  stand-in of ``harness.cpu`` cannot reach. ``build_vlm`` makes
  ``Tensor.cuda`` return the tensor itself for the duration of the
  constructor only, and only when no GPU exists.
* The ``clip`` subtype builds its ``ln_pre`` with
  ``build_module(torch.nn.LayerNorm, config=...)`` when Transformer Engine
  is missing, which ``torch.nn.LayerNorm`` refuses (``unexpected keyword
  argument 'config'``); ``siglip`` does the same with ``ln_post``. The
  vision tower is therefore the ``internvit`` subtype of the same
  ``CLIPViTModel`` (patch conv with bias, class token, learned position
  embeddings, no ln_pre / ln_post); everything else is LLaVA's.
* LLaVA asserts that sequence parallelism uses Transformer Engine's
  attention, so no sequence-parallel layout exists on CPU.
* With ``attention_mask=None`` megatron makes its causal mask on
  ``device="cuda"``; the harness passes its own mask.

SPEC's expectations for a LLaVA (module matching, parameter names, freeze
rules) are computed from names only, never by LoRA code, in
``harness.rules.vlm``, with the contract's other rules.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from harness.families.gpt.model import GPTShape, transformer_config
from harness.rules.vlm import FREEZE_FLAGS

__all__ = [
    "VLMShape",
    "build_vlm",
    "vlm_inputs",
    "IMAGE_TOKEN",
    "freeze_combos",
]


#: The id that marks an image's place in the text (LLaVA's default).
IMAGE_TOKEN = -200


@dataclass(frozen=True)
class VLMShape(GPTShape):
    """A LLaVA: a GPT language model (the ``GPTShape`` fields), a vision tower and a projection.

    ``seq_length`` is the number of *text* positions per sample, one of
    which is the image token; the language model sees
    ``seq_length - 1 + image_tokens`` positions. One image per sample,
    ``img_size`` x ``img_size`` pixels, ``patch_dim`` pixels a patch; the
    class token is dropped before the projection.
    """

    num_layers: int = 1
    hidden_size: int = 16
    num_attention_heads: int = 2
    num_query_groups: int = 2
    ffn_hidden_size: int = 32
    vocab_size: int = 32
    seq_length: int = 4
    micro_batch_size: int = 1
    gated_linear_unit: bool = False
    add_bias_linear: bool = True
    vision_hidden_size: int = 16
    vision_num_attention_heads: int = 2
    vision_ffn_hidden_size: int = 32
    vision_num_layers: int = 1
    img_size: int = 8
    patch_dim: int = 4
    projection_ffn_hidden_size: int = 32

    @property
    def image_tokens(self) -> int:
        return (self.img_size // self.patch_dim) ** 2

    @property
    def combined_length(self) -> int:
        return self.seq_length - 1 + self.image_tokens

    def check(self, tp: int) -> None:  # type: ignore[override]
        """Raise ShapeError naming the field, value and rule if TP=tp cannot shard this shape."""
        super().check(tp)
        rules = [
            ("seq_length", (self.seq_length - 1) * self.micro_batch_size >= tp,
             f"at least 1 + TP/micro_batch_size (the image token, and a text token for each of TP={tp} "
             "vocabulary shards, so that one optimizer step reaches every rank's word embeddings)"),
            ("vision_hidden_size", self.vision_hidden_size % self.vision_num_attention_heads == 0,
             f"a multiple of vision_num_attention_heads={self.vision_num_attention_heads}"),
            ("vision_num_attention_heads", self.vision_num_attention_heads % tp == 0, f"divisible by TP={tp}"),
            ("vision_ffn_hidden_size", self.vision_ffn_hidden_size % tp == 0, f"divisible by TP={tp}"),
            ("projection_ffn_hidden_size", self.projection_ffn_hidden_size % tp == 0, f"divisible by TP={tp}"),
            ("vision_num_layers", self.vision_num_layers >= 1, "at least 1"),
            ("img_size", self.img_size % self.patch_dim == 0, f"a multiple of patch_dim={self.patch_dim}"),
        ]
        self._require(rules, "VLMShape")


@contextlib.contextmanager
def _position_ids_on_cpu() -> Iterator[None]:
    """``Tensor.cuda`` as the identity while CLIPViTModel is constructed, when there is no GPU."""
    if torch.cuda.is_available():
        yield
        return
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.cuda = original  # type: ignore[method-assign]


def build_vlm(shape: VLMShape, *, tp: int, params_dtype: torch.dtype = torch.float32, parallel_output: bool = False,
              pipeline: Any = None) -> Any:
    """megatron-core's LLaVAModel for the active parallel_state (logits gathered over TP).

    ``pipeline``: the layout, at a pipeline layout (pp > 1): this rank's stage, the vision tower and the
    projection on the first stage only (``add_encoder``), the language model's layers split over the stages
    (its config carries the pipeline sizes; the vision tower's and the projection's do not).

    Language model: the local GPT layer spec (RMSNorm, RoPE, optional gated
    MLP), like ``harness.families.gpt.model.build_gpt``. Vision tower: megatron's local
    ViT layer spec (LayerNorm, no mask). Projection: megatron's MLP with
    column-parallel ``linear_fc1`` and row-parallel ``linear_fc2``.
    """
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.multimodal.llava_model import LLaVAModel
    from megatron.core.models.vision.vit_layer_specs import get_vit_layer_with_local_spec
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLPSubmodules

    from harness import cpu

    shape.check(tp)
    if cpu.is_active():
        # LLaVA's own modules (its forward asks torch.cuda for a device) were just imported.
        cpu.patch_loaded_modules()
    stage: dict[str, Any] = {}
    language_pipeline: dict[str, Any] = {}
    if pipeline is not None and pipeline.pp > 1:
        from megatron.core import parallel_state

        from harness.pipeline import pipeline_config

        first = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
        last = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        stage = dict(pre_process=first, post_process=last, add_encoder=first, add_decoder=True)
        language_pipeline = pipeline_config(pipeline, params_dtype)
    language = transformer_config(shape, tp=tp, params_dtype=params_dtype, **language_pipeline)
    vision_shape = GPTShape(
        num_layers=shape.vision_num_layers,
        hidden_size=shape.vision_hidden_size,
        num_attention_heads=shape.vision_num_attention_heads,
        num_query_groups=shape.vision_num_attention_heads,
        ffn_hidden_size=shape.vision_ffn_hidden_size,
        gated_linear_unit=False,
        add_bias_linear=True,
    )
    vision = transformer_config(vision_shape, tp=tp, params_dtype=params_dtype, normalization="LayerNorm")
    vision.vision_model_type = "internvit"  # see the module docstring: clip's ln_pre needs TE
    projection_shape = GPTShape(
        num_layers=1,
        hidden_size=shape.hidden_size,
        num_attention_heads=shape.num_attention_heads,
        num_query_groups=shape.num_query_groups,
        ffn_hidden_size=shape.projection_ffn_hidden_size,
        gated_linear_unit=False,
        add_bias_linear=True,
    )
    projection = transformer_config(projection_shape, tp=tp, params_dtype=params_dtype)
    with _position_ids_on_cpu():
        model = LLaVAModel(
            language_transformer_config=language,
            language_transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
            language_vocab_size=shape.vocab_size,
            language_max_sequence_length=shape.combined_length,
            vision_transformer_config=vision,
            vision_transformer_layer_spec=get_vit_layer_with_local_spec(),
            drop_vision_class_token=True,
            vision_projection_config=projection,
            vision_projection_layer_spec=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
            vision_projection_type="mlp",
            # False: the language model's output layer gathers the logits (the
            # strict contract's promise); True under bridge, as in training
            # (``harness.families.gpt.model.output_layer_gathers``). The logits only feed
            # a loss here; nothing compares them.
            parallel_output=parallel_output,
            language_position_embedding_type="rope",
            img_h=shape.img_size,
            img_w=shape.img_size,
            patch_dim=shape.patch_dim,
            image_token_index=IMAGE_TOKEN,
            **stage,
        )
    model.to(params_dtype)
    return model


def vlm_inputs(shape: VLMShape, seed: int, tp: int = 1, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Keyword arguments of ``LLaVAModel.forward``: seeded images, text ids with one image token per
    sample (at a seeded position) and text tokens in every one of the ``tp`` vocabulary shards,
    position ids and the causal mask over the combined sequence."""
    from harness.families.gpt.model import causal_mask
    from harness.sharding import seeded_tensor

    b, s = shape.micro_batch_size, shape.seq_length
    images = seeded_tensor(seed, "images", (b, 3, shape.img_size, shape.img_size)).to(dtype)
    g = torch.Generator().manual_seed(seed)
    where = torch.randint(0, s, (b,), generator=g)
    text = torch.ones(b, s, dtype=torch.bool)
    text[torch.arange(b), where] = False
    # Text token k lies in vocabulary shard k % tp (``VLMShape.check`` makes
    # sure there are at least tp text tokens), at a seeded row of it.
    shard = shape.vocab_size // tp
    k = torch.arange(int(text.sum()))
    ids = torch.full((b, s), IMAGE_TOKEN, dtype=torch.long)
    ids[text] = (k % tp) * shard + torch.randint(0, shard, (len(k),), generator=g)
    return dict(
        images=images,
        input_ids=ids,
        position_ids=torch.arange(s).unsqueeze(0).expand(b, s),
        attention_mask=causal_mask(shape.combined_length),
    )


# ----------------------------------------------------------- SPEC, from names


def freeze_combos() -> list[tuple[dict[str, bool], bool]]:
    """All 16 (freeze flags, training) combinations, in a fixed order."""
    out = []
    for bits in range(8):
        flags = {flag: bool(bits >> i & 1) for i, flag in enumerate(FREEZE_FLAGS)}
        for training in (True, False):
            out.append((flags, training))
    return out
