"""The toy family's case: a dense case under the family name "toy"."""

from dataclasses import dataclass
from typing import ClassVar

from harness.families.gpt.case import GPTCase


@dataclass(frozen=True)
class ToyCase(GPTCase):
    family: ClassVar[str] = "toy"
