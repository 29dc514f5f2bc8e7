"""Bug (the class Megatron-Bridge's matcher has): patterns matched against a pipeline stage's local module
names. megatron-core numbers a stage's layers from 0 (``decoder.layers.0`` on every stage), so at PP=2
``*.layers.0.*.linear_qkv`` ("the first layer only") adapts the first layer of every stage."""

from dataclasses import dataclass

from lora.megatron.walk import walk_and_replace
from tests.wrong_impls._base import LoRAMerge, VLMLoRA  # noqa: F401
from tests.wrong_impls._base import _CorrectLoRA


@dataclass
class LoRA(_CorrectLoRA):
    def _walk_chunk(self, chunk):
        return walk_and_replace(chunk, self._visit, self._leave)
