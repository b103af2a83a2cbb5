"""Optimizers for memory-efficient pretraining.

``ProjectedAdamW`` is AdamW with, per parameter group: GaLore/APOLLO gradient projection (exact,
randomized or random basis), Fira's residual, SPAM sparse momentum, spike clipping and momentum
resets with warm-up, and Stable-SPAM's adaptive clipping and norm scaling. The math lives in
pure tensor functions in ``projection`` and ``spikes``; seeded draws in :mod:`lowrank.seeding`.
"""

from .adamw import OPTION_DEFAULTS, ProjectedAdamW, StateBytes

__all__ = ["OPTION_DEFAULTS", "ProjectedAdamW", "StateBytes"]
