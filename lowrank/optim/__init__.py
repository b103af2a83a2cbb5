"""Optimizers for memory-efficient pretraining.

``ProjectedAdamW`` is AdamW with, per parameter group: GaLore/APOLLO gradient projection (exact,
randomized or random basis), Fira's residual, SPAM sparse momentum, spike clipping and momentum
resets with warm-up, and Stable-SPAM's adaptive clipping and norm scaling. The math lives in
pure tensor functions in ``projection`` and ``spikes``; seeded draws in :mod:`lowrank.seeding`;
which state tensors exist (names, shapes, dtypes) in ``layout``, the one statement of the state
format that the optimizer allocates from and the memory estimator sums.
"""

from .adamw import OPTION_DEFAULTS, ProjectedAdamW, StateBytes
from .layout import ParamStateLayout, TensorSpec, state_layout, torch_adamw_state_layout

__all__ = [
    "OPTION_DEFAULTS",
    "ParamStateLayout",
    "ProjectedAdamW",
    "StateBytes",
    "TensorSpec",
    "state_layout",
    "torch_adamw_state_layout",
]
