"""The init run, shared by the families' init tasks: the implementation's initial adapters on a model big enough to test their distribution.

The dense init task (``harness.families.gpt.init.run_init_case``) builds, at the case's layout, a one-layer GPT of a fixed
shape (``harness.families.gpt.init.init_shape``: hidden 128, ffn 256, vocab 128, heads and query
groups divisible by TP) with the case's gated MLP / bias flags, applies
``impl.LoRA(...)`` with the case's seed, init methods, patterns, alpha,
dropout, dtypes and training mode but rank ``init_dim`` (128, a multiple of
TP), and returns the initial adapters (A and B of every adapted module,
each rank's shard) with the partition table that puts them back together.
No harness weights are loaded and nothing is run backward: the draw itself
is the evidence (``harness.properties.init_distribution`` tests it).

When A or B is initialised to zero, the adapted model must compute exactly
what the base model computes: the task runs the base model's forward on a
seeded input before LoRA is applied and the adapted model's after, and
records on each rank whether the logits are bitwise equal
(``extras.zero_forward``, ``harness.evidence.InitExtras``).

If the case's patterns adapt no module of this one-layer model (a pattern
naming a second layer, say), the default target modules are used
(``extras.targets`` says which).
"""

from __future__ import annotations

__all__ = ["init_dim", "INIT_HIDDEN", "INIT_FFN", "INIT_VOCAB", "INIT_DIM"]

#: The init model's widths. With rank 128 every adapter matrix has at least
#: 128 * 128 = 16384 entries (see harness.properties.init_distribution for
#: what that buys), and the column/row splits at TP=2 change Xavier's fans
#: by at least a factor 4/3 in variance.
INIT_HIDDEN = 128
INIT_FFN = 256
INIT_VOCAB = 128
INIT_DIM = 128


def init_dim(tp: int) -> int:
    """The adapter rank of the init run: INIT_DIM rounded up to a multiple of ``tp``."""
    return -(-INIT_DIM // tp) * tp
