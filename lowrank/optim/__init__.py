"""Optimizers for memory-efficient pretraining, one module per technique.

``ProjectedAdamW`` (:mod:`.adamw`) is AdamW with, per parameter group: GaLore/APOLLO gradient
projection (exact, randomized or random basis), Fira's residual, SPAM sparse momentum, spike
clipping and momentum resets with warm-up, Stable-SPAM's adaptive clipping and norm scaling, and
8- or 4-bit block-quantized moments (``state_bits``). The class holds groups and state and loops;
the math is pure tensor functions, each in the module named after its technique, with its formula
and source:

* :mod:`.adam` — Adam's moments, bias correction, decoupled weight decay (and the foreach form);
* :mod:`.projection` — GaLore/APOLLO bases, projection and back-projection, APOLLO's update;
* :mod:`.fira` — Fira's residual and its norm-growth limiter;
* :mod:`.sparse` — sparse-momentum subsets;
* :mod:`.spikes` — SPAM spike clipping, Stable-SPAM's adaptive clipping and norm scaling;
* :mod:`.reset` — momentum resets and the warm-up after them;
* :mod:`.lowbit` — 8-/4-bit block-wise quantization of the moments;
* :mod:`.update` — one parameter's update composed from the above (``ProjectedAdamW.step_param``
  and ``step()`` both run it);
* :mod:`.shard` — FSDP2 row-shard arithmetic and collectives; :mod:`.options` — every default
  and check; :mod:`.layout` — which state tensors exist (the optimizer allocates from it, the
  memory estimator sums it); seeded draws in :mod:`lowrank.seeding`.

``Muon`` (:mod:`.muon`) runs Muon on the hidden matrices and ProjectedAdamW on the other
parameters (``muon_param_groups`` builds the split).
"""

from .adamw import ProjectedAdamW
from .layout import ParamStateLayout, StateBytes, TensorSpec, state_layout, torch_adamw_state_layout
from .muon import Muon, muon_param_groups
from .options import ADAM_DEFAULTS, OPTION_DEFAULTS, check_state_dict, validate_group
from .projection import projector_refresh_due

__all__ = [
    "ADAM_DEFAULTS",
    "Muon",
    "OPTION_DEFAULTS",
    "ParamStateLayout",
    "ProjectedAdamW",
    "StateBytes",
    "TensorSpec",
    "check_state_dict",
    "muon_param_groups",
    "projector_refresh_due",
    "state_layout",
    "torch_adamw_state_layout",
    "validate_group",
]
