"""Bug: under virtual pipeline stages megatron hands the PEFT a list of model chunks; this one adapts the
first chunk only (the others are frozen and keep no adapter), so half of a stage's layers train nothing."""

from dataclasses import dataclass

from tests.wrong_impls._base import LoRAMerge, VLMLoRA  # noqa: F401
from tests.wrong_impls._base import _CorrectLoRA


@dataclass
class LoRA(_CorrectLoRA):
    def __call__(self, model, training=True):
        self._chunks_walked = 0
        return super().__call__(model, training=training)

    def _walk_chunk(self, chunk):
        self._chunks_walked = self.__dict__.get("_chunks_walked", 0) + 1
        return super()._walk_chunk(chunk) if self._chunks_walked == 1 else chunk
