"""Gradient-spike handling (SPAM, arXiv 2501.06842; Stable-SPAM, arXiv 2502.17055) as pure functions.

All functions return new tensors or update 0-dim statistic tensors in place; none of them reads a
value back to the host, so they do not synchronise a GPU.

Stable-SPAM's statistics (``max|g|``, ``‖g‖``) describe the whole gradient. When ``grad`` is one
rank's shard of it (FSDP2), the caller passes ``max_of`` / ``norm_of``, which turn the local
tensor into the global value (an all-reduce MAX of the shard maxima, an all-reduce SUM of the
shards' ``‖g_i‖²``: one scalar collective each); without them the statistics are the local
tensor's, computed exactly as before.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .reset import reset_warmup_factor  # noqa: F401  (SPAM's post-reset ramp; it lives with the reset)

Reduction = Callable[[torch.Tensor], torch.Tensor]


def spam_clip(grad: torch.Tensor, exp_avg_sq: torch.Tensor, threshold: float) -> torch.Tensor:
    """SPAM spike-aware clipping: where ``g² > θ·v`` replace ``g`` by ``sign(g)·sqrt(θ·v)``.

    ``exp_avg_sq`` is Adam's second moment *before* this step's update (``v_{t-1}``), without bias
    correction, as in the paper. Entries with ``v_{t-1} = 0`` are passed through unclipped: they
    have never seen a gradient, so there is no history to call this one a spike against, and a
    bound of ``sqrt(θ·0) = 0`` would zero the gradient and freeze the entry for good (an embedding
    row first used after the skip window would never train; the published SPAM code and
    pytorch-optimizer's ``SPAM`` have this fault). Callers also skip the whole clip for a few steps
    after a reset, while every ``v`` is still near zero.
    """
    # |g| > sqrt(θv) is g² > θv, and sign(g)·sqrt(θv) is then the nearer bound, so the rule is a
    # clamp to ±sqrt(θv). Where v = 0 the bound is +inf: no clipping.
    bound = (threshold * exp_avg_sq).sqrt_().masked_fill_(exp_avg_sq == 0, float("inf"))
    return torch.clamp(grad, min=-bound, max=bound)


def adaptive_clip(
    grad: torch.Tensor, max_abs_avg: torch.Tensor, gamma: float, step: int, max_of: Reduction | None = None
) -> torch.Tensor:
    """Stable-SPAM adaptive spike clipping.

    Keeps an EMA of ``max|g|`` (``max_abs_avg``, updated in place) with decay ``gamma`` (γ3), bias
    corrected with ``step`` (1-based count of gradients seen). Entries with ``|g|`` above the
    corrected average ``T`` are rescaled to ``g / max|g| · T``: the largest entry lands on ``T`` and
    the order of the spiking entries is kept. ``max_of``: maps ``|grad|`` to the global maximum
    when ``grad`` is a shard (module docstring); ``None``: ``|grad|.max()``.
    """
    magnitude = grad.abs()
    max_abs = magnitude.max() if max_of is None else max_of(magnitude)
    max_abs_avg.lerp_(max_abs.to(max_abs_avg.dtype), 1.0 - gamma)
    threshold = max_abs_avg / (1.0 - gamma**step)
    return torch.where(magnitude > threshold, grad / max_abs * threshold, grad)


def norm_scaling(
    grad: torch.Tensor,
    norm_avg: torch.Tensor,
    norm_sq_avg: torch.Tensor,
    gamma_norm: float,
    gamma_norm_sq: float,
    step: int,
    eps: float,
    norm_of: Reduction | None = None,
) -> torch.Tensor:
    """Stable-SPAM adaptive gradient-norm scaling: ``g ← g / ‖g‖ · m̂ / (sqrt(v̂) + eps)``.

    ``m``, ``v`` are EMAs of ``‖g‖`` (decay γ1) and ``‖g‖²`` (decay γ2), updated in place and bias
    corrected with ``step``. The result has norm close to a running average of past norms, so one
    spiking batch cannot blow up the update. A zero gradient is returned unchanged and leaves the
    statistics untouched (the reference skips the parameter instead). ``norm_of``: maps ``grad``
    to the global ``‖g‖`` when it is a shard (module docstring); ``None``: its own norm.
    """
    norm = (torch.linalg.vector_norm(grad) if norm_of is None else norm_of(grad)).to(norm_avg.dtype)
    active = norm > 0
    norm_avg.copy_(torch.where(active, torch.lerp(norm_avg, norm, 1.0 - gamma_norm), norm_avg))
    norm_sq_avg.copy_(torch.where(active, torch.lerp(norm_sq_avg, norm.square(), 1.0 - gamma_norm_sq), norm_sq_avg))
    mean = norm_avg / (1.0 - gamma_norm**step)
    rms = (norm_sq_avg / (1.0 - gamma_norm_sq**step)).sqrt()
    target = mean / (rms + eps)
    safe_norm = torch.where(active, norm, torch.ones_like(norm))
    return torch.where(active, grad / safe_norm * target, grad)


def stable_spam(
    grad: torch.Tensor,
    *,
    gammas: tuple[float, float, float],
    step: int,
    eps: float,
    max_abs_avg: torch.Tensor | None = None,
    norm_avg: torch.Tensor | None = None,
    norm_sq_avg: torch.Tensor | None = None,
    max_of: Reduction | None = None,
    norm_of: Reduction | None = None,
) -> torch.Tensor:
    """Stable-SPAM on the raw gradient, before it enters Adam: :func:`adaptive_clip` when
    ``max_abs_avg`` is given, then :func:`norm_scaling` when ``norm_avg`` / ``norm_sq_avg`` are.
    ``gammas = (γ1, γ2, γ3)``: the decays of ``‖g‖``, ``‖g‖²`` and ``max|g|``; ``step`` is the
    1-based count of gradients seen (these statistics are not reset with the moments: they
    describe the gradient)."""
    gamma_norm, gamma_norm_sq, gamma_max = gammas
    if max_abs_avg is not None:
        grad = adaptive_clip(grad, max_abs_avg, gamma_max, step, max_of=max_of)
    if norm_avg is not None:
        grad = norm_scaling(grad, norm_avg, norm_sq_avg, gamma_norm, gamma_norm_sq, step, eps, norm_of=norm_of)
    return grad
