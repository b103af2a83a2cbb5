"""Optimizers for memory-efficient pretraining.

``ProjectedAdamW`` is AdamW with, per parameter group: GaLore/APOLLO gradient projection (exact,
randomized or random basis), Fira's residual, SPAM sparse momentum, spike clipping and momentum
resets with warm-up, Stable-SPAM's adaptive clipping and norm scaling, and 8- or 4-bit
block-quantized moments (``state_bits``). The math lives in pure tensor functions in
``projection``, ``spikes`` and ``lowbit`` (the quantizer); seeded draws in :mod:`lowrank.seeding`;
which state tensors exist (names, shapes, dtypes) in ``layout``, the one statement of the state
format that the optimizer allocates from and the memory estimator sums. ``Muon`` runs Muon on the
hidden matrices and ProjectedAdamW on the other parameters (``muon_param_groups`` builds the split).
"""

from .adamw import OPTION_DEFAULTS, ProjectedAdamW, StateBytes
from .layout import ParamStateLayout, TensorSpec, state_layout, torch_adamw_state_layout
from .muon import Muon, muon_param_groups

__all__ = [
    "Muon",
    "OPTION_DEFAULTS",
    "ParamStateLayout",
    "ProjectedAdamW",
    "StateBytes",
    "TensorSpec",
    "muon_param_groups",
    "state_layout",
    "torch_adamw_state_layout",
]
