"""The ``training`` section: gradient clipping, non-finite and dead steps, parameter storage."""

from __future__ import annotations

from dataclasses import dataclass

from ...precision import PARAM_DTYPES, ROUNDINGS
from .base import SectionView, _Check

NONFINITE_POLICIES = ("skip", "stop")


@dataclass(frozen=True)
class TrainingSection(SectionView):
    """The step itself (:mod:`lowrank.run.health` says why these exist):

    * ``grad_clip``: clip the global gradient norm to this (``null`` or 0: no clipping).
    * ``nonfinite_grads``: a step whose gradient norm is NaN or infinite is skipped (``skip``:
      no update, the run goes on) or ends the run (``stop``).
    * ``max_skipped_steps``: stop after this many skipped steps in a row.
    * ``dead_steps``: stop after this many steps in a row with an exactly zero gradient (0: never).
    * ``param_dtype``: ``fp32`` or ``bf16`` storage of parameters and gradients (``--param-dtype``
      overrides it; :mod:`lowrank.precision`).
    * ``bf16_rounding``: how the optimizer writes an fp32 result into a bf16 parameter:
      ``stochastic`` (unbiased) or ``nearest``.
    * ``activation_checkpointing``: recompute every decoder layer in backward
      (``--activation-checkpointing`` turns it on).
    * ``layerwise_step``: update each parameter inside backward as soon as its gradient is
      complete and free the gradient (``--layerwise-step`` turns it on; :mod:`lowrank.run.layerwise`
      says how clipping and non-finite gradients work there).
    """

    grad_clip: float | None = 1.0
    nonfinite_grads: str = "skip"
    max_skipped_steps: int = 10
    dead_steps: int = 20
    param_dtype: str = "fp32"
    bf16_rounding: str = "stochastic"
    activation_checkpointing: bool = False
    layerwise_step: bool = False

    NAME = "training"
    CHECKS = {
        "grad_clip": _Check.optional(_Check.number(0.0)),
        "nonfinite_grads": _Check.choice(NONFINITE_POLICIES),
        "max_skipped_steps": _Check.integer(1),
        "dead_steps": _Check.integer(0),
        "param_dtype": _Check.choice(tuple(PARAM_DTYPES)),
        "bf16_rounding": _Check.choice(ROUNDINGS),
        "activation_checkpointing": _Check.flag(),
        "layerwise_step": _Check.flag(),
    }
