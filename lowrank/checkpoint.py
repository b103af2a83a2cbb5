"""Moved to :mod:`lowrank.run.checkpoint` (the run folder's checkpoints); this name stays for
code written against earlier versions."""

from .run.checkpoint import *  # noqa: F401,F403
from .run.checkpoint import __all__  # noqa: F401
from .files import atomic_write_bytes  # noqa: F401
