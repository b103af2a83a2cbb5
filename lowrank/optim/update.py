"""One parameter's ProjectedAdamW update, composed from one function per technique.

For a parameter ``W`` whose gradient ``G`` has been through Stable-SPAM
(:func:`lowrank.optim.spikes.stable_spam`) and, when projected, into ``R`` (``low``:
:func:`lowrank.optim.projection.project`), :func:`adamw_update_` does, in this order::

    x = R, or R.flat[I] (sparse momentum, lowrank.optim.sparse)
    x ← clip(x, ±sqrt(θ v))                  SPAM spike clipping (spikes.spam_clip), after the skip window
    m, v ← Adam moments of x                   (adam.adam_moments_)
    D = m / (sqrt(v) + eps')                   (adam.adam_direction)
    W ← W (1 − lr·wd)                          decoupled weight decay, every entry (adam.decay_weights_)
    U = D                                      plain / low-rank factor
      | scale · P D  [+ Fira residual]         GaLore, Fira (projection.project_back, fira.fira_residual)
      | scale · limit(G · ‖D_j‖/‖R_j‖)         APOLLO (projection.apollo_update)
    W ← W − lr · sqrt(1−β2ᵗ)/(1−β1ᵗ) · warm-up · U   (adam.adam_step_size, reset.warmup_factor)

with the sparse ``D`` scattered back to ``R``'s shape first (or, unprojected, added straight into
``W``'s kept entries). The caller (:class:`lowrank.optim.ProjectedAdamW`) owns where the state
lives: it passes the moments (the state tensors, or their low-bit codes decoded to fp32, which it
encodes back afterwards), the subset, the limiter's state and, under FSDP2, the parameter's
:class:`~lowrank.optim.shard.RowShard`; this function advances the step counters and updates
``param`` and the moments in place.
"""

from __future__ import annotations

from typing import Any

import torch

from . import projection as proj
from . import sparse
from .adam import adam_direction, adam_moments_, adam_step_size, decay_weights_
from .fira import fira_residual
from .reset import warmup_factor
from .shard import RowShard
from .spikes import spam_clip


def project_back(low: torch.Tensor, basis: torch.Tensor, shape: torch.Size, shard: RowShard | None) -> torch.Tensor:
    """``P X`` / ``X Pᵀ``: the whole tensor, or this rank's rows of it under FSDP2."""
    if shard is None:
        return proj.project_back(low, basis, shape)
    return proj.project_back_rows(low, basis, shape, shard.start, shard.rows)


def adamw_update_(
    param: torch.Tensor,
    grad: torch.Tensor,
    low: torch.Tensor,
    moment_input: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    state: dict[str, Any],
    group: dict[str, Any],
    *,
    shape: torch.Size,
    indices: torch.Tensor | None = None,
    limiter_norm: torch.Tensor | None = None,
    shard: RowShard | None = None,
) -> None:
    """One step of one parameter (module docstring), in place on ``param``, the moments and the
    counters ``state["step"]`` / ``state["total_step"]``.

    ``param``: the parameter's tensor (its local rows under FSDP2); ``grad``: its gradient in the
    state dtype; ``low``: ``R`` when projected (``state["projector"]`` is ``P``), else ``grad``;
    ``moment_input``: what enters the moments, ``low`` or its entries at the sparse ``indices``,
    in the moments' dtype; ``exp_avg`` / ``exp_avg_sq``: shaped like ``moment_input``;
    ``shape``: the whole parameter's; ``limiter_norm``: Fira's / APOLLO's limiter state.
    """
    dtype = group["state_dtype"] or param.dtype
    beta1, beta2 = group["betas"]
    lr = group["lr"]
    kind = group["projection"] if param.dim() == 2 else None

    if group["spike_threshold"] > 0 and state["step"] >= group["spike_skip_steps"]:
        moment_input = spam_clip(moment_input, exp_avg_sq, group["spike_threshold"])
    state["step"] += 1
    state["total_step"] += 1
    adam_moments_(exp_avg, exp_avg_sq, moment_input, beta1, beta2)
    direction = adam_direction(exp_avg, exp_avg_sq, state["step"], beta2, group["eps"], dtype)
    step_size = adam_step_size(lr, state["step"], beta1, beta2, warmup_factor(state, group["reset_warmup"]))
    decay_weights_(param, lr, group["weight_decay"])

    if indices is not None:
        if kind is None and param.is_contiguous():
            sparse.apply_(param, indices, direction, step_size)
            return
        direction = sparse.scatter(direction, indices, low.shape)

    # In-place arithmetic below on purpose: these are full m×n temporaries.
    if kind in ("svd", "randomized"):
        update = project_back(direction, state["projector"], shape, shard).mul_(group["scale"])
        if group["residual"] == "fira":
            back = project_back(low, state["projector"], shape, shard)
            update.add_(fira_residual(grad, back, direction, low, shape, limiter_norm,
                                      norm_of=None if shard is None else shard.norm))
    elif kind == "random":
        update = proj.apollo_update(
            grad, direction, low, shape, limiter_norm,
            per_channel=group["scale_type"] == "channel",
            scale=group["scale"],
            # APOLLO-Mini's tensor-wise norms of a row-sharded R are the whole R's.
            norm_of=shard.norm if shard is not None and not proj.is_left(shape) else None,
            limiter_norm_of=None if shard is None else shard.norm,
        )
    else:
        update = direction
    param.add_(update.to(param.dtype), alpha=-step_size)
