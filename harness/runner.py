"""Compatibility name for the rank pool: everything public is in :mod:`harness.pool`.

``harness.runner`` used to hold the whole rank pool; it is now the package
``harness/pool/`` with one job per module (see its docstring). Downstream
code that imports ``harness.runner`` keeps working: this module re-exports
the package's public names. The harness itself imports ``harness.pool``.
"""

from harness.pool import *  # noqa: F401,F403 - the re-export is this module's whole job
from harness.pool import __all__  # noqa: F401
