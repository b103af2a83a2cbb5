"""Fira's residual (Chen et al. 2024, "Fira: Can We Achieve Full-rank Training of LLMs Under
Low-rank Constraint?", arXiv 2410.01623): the part of the gradient GaLore's projection drops.

With the basis ``P`` (:mod:`lowrank.optim.projection`), ``R = PᵀG`` (or ``GP``) and Adam's
direction on it ``Adam(R)``, Fira adds to GaLore's update the true orthogonal complement, scaled
per channel by the ratio Adam applied to the projected gradient::

    S = (G − P PᵀG) · φ,   φ_j = ‖Adam(R)_j‖ / ‖R_j‖        (per column if left, per row if right)
    S ← S / max(1, ‖S‖ / (γ ‖S_prev‖)),   γ = 1.01             (the norm-growth limiter)

The limiter (:func:`lowrank.optim.projection.limit_norm_growth`, shared with APOLLO) keeps a
spike in ``G`` from entering the update at full size. ``S`` is not multiplied by GaLore's
``scale``, as in Fira; unlike Fira's code, ``scale`` never leaks into the residual.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .projection import channel_scaling, limit_norm_growth


def fira_residual(
    grad: torch.Tensor,
    back: torch.Tensor,
    direction: torch.Tensor,
    low: torch.Tensor,
    shape: torch.Size | tuple[int, ...],
    limiter_norm: torch.Tensor,
    norm_of: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """``S`` above from the gradient ``grad``, its projection ``back = P PᵀG`` (projected back;
    overwritten: it is a full-size temporary), Adam's ``direction`` on ``low = R``, and the
    limiter's state ``limiter_norm`` (a 0-dim tensor, updated in place). ``shape``: the whole
    gradient's; ``norm_of``: the whole tensor's norm when ``grad`` is a row shard (FSDP2)."""
    residual = torch.sub(grad, back, out=back)
    residual.mul_(channel_scaling(direction, low, shape))
    return limit_norm_growth(residual, limiter_norm, norm_of=norm_of)
