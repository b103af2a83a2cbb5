"""Momentum resets and the warm-up after them (SPAM, Huang et al. 2025, arXiv 2501.06842: "momentum
reset" and its cosine warm-up; Stable-SPAM, arXiv 2502.17055, resets every T steps too).

A reset zeroes Adam's moments and restarts bias correction, so ``t`` counts from 1 again; it
happens every ``reset_interval`` = T steps of the parameter's own clock (``total_step``), and
whenever a layer event changes the parameter's coordinates (refactorization, a ReLoRA merge:
:meth:`ProjectedAdamW.reset_momentum`). While ``v`` is nearly zero after a reset Adam's steps
are large, so SPAM scales the update by a factor rising along a cosine from 0.01 to 1 over
``reset_warmup`` = W steps (:func:`reset_warmup_factor`). There is no such ramp at the start of
training: the LR schedule does that.

The state counters: ``step`` (Adam steps since the last reset), ``total_step`` (steps ever) and
``resets`` (how many; also the sparse-momentum period, :mod:`lowrank.optim.sparse`).
"""

from __future__ import annotations

import math
from typing import Any

from .layout import ABSMAX_KEYS, MOMENT_KEYS


def init_counters(state: dict[str, Any]) -> None:
    """The counters of a parameter that has never stepped."""
    if "step" not in state:
        state["step"] = 0
        state["total_step"] = 0
        state["resets"] = 0


def scheduled_reset_due(state: dict[str, Any], interval: int) -> bool:
    """Whether the step about to run starts with a scheduled reset: after every ``interval``
    steps of the parameter (``0``: never), once it has moments to reset."""
    total = state["total_step"]
    return bool(interval) and total > 0 and total % interval == 0 and "exp_avg" in state


RESET_MOMENTS = ("both", "first")
DEFAULT_RESET_MOMENTS = RESET_MOMENTS[0]
"""What a momentum reset clears: ``both`` moments (and bias correction restarts), or only the
``first`` — Adam's ``v`` and its bias correction go on, so ``m`` rebuilds from zero over about
``1/(1 − β₁)`` steps uncorrected: the first updates after the reset are ``(1 − β₁)·g/√v̂``-sized, a
built-in warm-up, where a full reset makes them ``sign(g)``-sized (``|Δ| = lr`` per entry)."""


def reset_state_(state: dict[str, Any], moments: str = DEFAULT_RESET_MOMENTS) -> None:
    """Zero the moments (quantized ones: codes and block scales, which dequantize to zero), restart
    bias correction, count the reset, and forget the norm-growth limiter's history. With
    ``moments="first"`` only ``exp_avg`` is zeroed; ``exp_avg_sq``, the step count (bias
    correction) and the period (a sparse subset, whose ``v`` is kept) go on."""
    if moments not in RESET_MOMENTS:
        raise ValueError(f"moments must be one of {', '.join(RESET_MOMENTS)}, got {moments!r}")
    if moments == "first":
        state["exp_avg"].zero_()
        if ABSMAX_KEYS["exp_avg"] in state:
            state[ABSMAX_KEYS["exp_avg"]].zero_()
        return
    for key in MOMENT_KEYS:
        state[key].zero_()
        if ABSMAX_KEYS[key] in state:
            state[ABSMAX_KEYS[key]].zero_()
    state["step"] = 0
    state["resets"] += 1
    if "limiter_norm" in state:
        state["limiter_norm"].zero_()


def reset_warmup_factor(steps_since_reset: int, warmup_steps: int) -> float:
    """SPAM's post-reset ramp: ``0.01`` at the reset step rising along a cosine to ``1``.

    ``factor(k) = 0.01 + 0.99 · (1 − cos(π k / W)) / 2`` for ``k < W`` steps since the reset, and
    ``1`` from ``k = W`` on.
    """
    if warmup_steps <= 0 or steps_since_reset >= warmup_steps:
        return 1.0
    return 0.01 + 0.99 * 0.5 * (1.0 - math.cos(math.pi * steps_since_reset / warmup_steps))


def warmup_factor(state: dict[str, Any], warmup_steps: int) -> float:
    """The factor of this step's update (``state["step"]`` already counts it): 1 before the first
    reset, :func:`reset_warmup_factor` after one."""
    if state["resets"] == 0:
        return 1.0
    return reset_warmup_factor(state["step"] - 1, warmup_steps)
