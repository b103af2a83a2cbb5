"""Gradient projection for GaLore, Fira and APOLLO, as pure functions on tensors.

* GaLore (Zhao et al. 2024, arXiv 2403.03507, Algorithm 1): every ``update_proj_gap`` = T steps
  (:func:`projector_refresh_due`) a basis ``P`` of the top-r singular vectors of ``G``
  (:func:`svd_basis`; :func:`randomized_basis` is a cheaper range finder for the same subspace);
  Adam runs on ``R = PᵀG`` and the update is ``scale · P·Adam(R)`` (:func:`project`,
  :func:`project_back`).
* APOLLO (Zhu et al. 2024, arXiv 2412.05270, Algorithm 1): a seeded Gaussian ``P`` with
  ``N(0, 1/r)`` entries (:func:`gaussian_projection`); the update is the raw gradient scaled per
  channel, ``scale · limit(G · ‖Adam(R)_j‖ / ‖R_j‖)`` (:func:`apollo_update`; APOLLO-Mini: one
  tensor-wise factor and rank 1).
* Fira's residual, which also uses :func:`channel_scaling` and :func:`limit_norm_growth`, is
  :mod:`lowrank.optim.fira`.

Convention: for a gradient ``G`` of shape ``(m, n)`` the projection acts on the smaller side, and
the basis is always stored as a ``(min(m, n), r)`` matrix ``P`` whose columns span the subspace:

* ``m < n`` ("left"):   ``R = Pᵀ G`` has shape ``(r, n)`` and ``project_back(X) = P X``;
* ``m >= n`` ("right"): ``R = G P`` has shape ``(m, r)`` and ``project_back(X) = X Pᵀ``.

This is GaLore's ``proj_type="std"`` (arXiv 2403.03507); GaLore stores the right basis transposed
(``r × n``), which holds the same numbers.

Row shards (FSDP2 holds rows ``start : start + h`` of ``G`` on each rank; the basis is
replicated): :func:`project_rows` and :func:`project_back_rows` give this rank's part of ``R``
and of the update. Right (``m ≥ n``): ``R = G P`` has ``G``'s rows, so both directions are local
matrix products with no communication, and ``R`` is row-sharded like ``G``. Left (``m < n``):
``R = Pᵀ G = Σ_ranks P[rows]ᵀ G[rows]`` needs one all-reduce of the ``r × n`` partial products
per step, after which ``R`` is replicated; projecting back (``P[rows] · X``) is local. The
Fira/APOLLO channel norms are then local too (right: per row of ``R``, which each rank has
whole; left: per column of the replicated ``R``); only whole-tensor norms (APOLLO-Mini's
tensor-wise factor on a row-sharded ``R``, the norm-growth limiter) need a scalar all-reduce,
passed in as ``norm_of``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ..seeding import STREAM_GAUSSIAN, STREAM_SKETCH, cpu_generator

# Fira and APOLLO add this to the denominator of their norm ratios; kept identical so that the
# results match theirs.
NORM_EPS = 1e-8


def is_left(shape: torch.Size | tuple[int, ...]) -> bool:
    """True when the basis lives on the row side (``m < n``), as GaLore decides."""
    return shape[0] < shape[1]


def effective_rank(shape: torch.Size | tuple[int, ...], rank: int) -> int:
    """The rank actually used: a basis cannot have more columns than its side has rows."""
    return min(rank, min(shape))


def svd_basis(grad: torch.Tensor, rank: int) -> torch.Tensor:
    """Top-``rank`` singular vectors of ``grad`` on its smaller side, ``(min(m, n), r)``, fp32.

    The slice is copied: a view would keep the whole ``U`` or ``Vᵀ`` (``min(m,n)²`` entries) alive.
    """
    r = effective_rank(grad.shape, rank)
    u, _, vh = torch.linalg.svd(grad.float(), full_matrices=False)
    if is_left(grad.shape):
        return u[:, :r].contiguous()
    return vh[:r].t().contiguous()


def _orthonormalize(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(x, mode="reduced").Q


def randomized_basis(
    grad: torch.Tensor,
    rank: int,
    *,
    seed: tuple[int, ...],
    oversample: int = 8,
    power_iters: int = 2,
) -> torch.Tensor:
    """Randomized range finder (Halko, Martinsson & Tropp 2011, algorithms 4.4 and 5.1).

    Sketches the smaller side with ``rank + oversample`` Gaussian vectors, sharpens the sketch with
    ``power_iters`` = q orthonormalized power iterations (the sketch then sees ``σ^(2q+1)``, which
    separates the top r directions from the tail), then solves the small projected problem exactly. The sketch is drawn
    on the CPU from ``seed`` (a tuple for :func:`cpu_generator`) so every process gets the same
    basis. Cost ``O(mn(r+p)(2q+2))`` instead of a full SVD's ``O(mn·min(m,n))``.
    """
    a = grad.float()
    if not is_left(a.shape):
        a = a.t()  # now a is (small, large) and we want its left basis
    small, large = a.shape
    r = effective_rank(a.shape, rank)
    width = min(r + oversample, small)
    omega = torch.randn(large, width, generator=cpu_generator(*seed, STREAM_SKETCH)).to(a.device)
    q = _orthonormalize(a @ omega)
    for _ in range(power_iters):
        q = _orthonormalize(a.t() @ q)
        q = _orthonormalize(a @ q)
    # Left singular vectors of the small ``B = Qᵀ A`` from the eigenvectors of ``B Bᵀ``: an
    # ``(r+p)²`` eigenproblem instead of an SVD of the ``(r+p) × large`` matrix, which dominated the
    # cost. fp64 keeps the squared spectrum resolvable (fp32 would blur σ below ~3e-4·σ_max).
    b = (q.t() @ a).double()
    _, eigvecs = torch.linalg.eigh(b @ b.t())  # ascending eigenvalues
    u_small = eigvecs.flip(1)[:, :r].to(q.dtype)
    return (q @ u_small).contiguous()


def gaussian_projection(
    shape: torch.Size | tuple[int, ...], rank: int, *, seed: tuple[int, ...], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """APOLLO's random projection: ``(min(m, n), r)`` with i.i.d. ``N(0, 1/r)`` entries, fp32.

    Not orthonormal; ``Pᵀ P ≈ (d/r) I`` only in expectation, which is why APOLLO never projects
    back and uses ``R`` only to estimate per-channel scaling factors.
    """
    r = effective_rank(shape, rank)
    side = min(shape)
    draw = torch.randn(side, r, generator=cpu_generator(*seed, STREAM_GAUSSIAN))
    return (draw / math.sqrt(r)).to(device)


def project(grad: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``R = Pᵀ G`` (left) or ``G P`` (right)."""
    if is_left(grad.shape):
        return basis.t() @ grad
    return grad @ basis


def project_back(low: torch.Tensor, basis: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Map an ``R``-shaped tensor back to the parameter's ``shape``: ``P X`` or ``X Pᵀ``."""
    if is_left(shape):
        return basis @ low
    return low @ basis.t()


def project_rows(
    grad_rows: torch.Tensor,
    basis: torch.Tensor,
    shape: torch.Size | tuple[int, ...],
    start: int,
    all_reduce: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """This rank's ``R`` from rows ``start : start + h`` of a gradient of global ``shape``.

    Right: ``grad_rows @ P``, the same rows of ``R`` (local). Left: ``all_reduce`` (a SUM over the
    ranks, in place, returning its argument) of ``P[rows]ᵀ · grad_rows``: the whole ``R``.
    """
    if is_left(shape):
        partial = basis[start : start + grad_rows.shape[0]].t() @ grad_rows
        return all_reduce(partial)
    return grad_rows @ basis


def project_back_rows(
    low: torch.Tensor, basis: torch.Tensor, shape: torch.Size | tuple[int, ...], start: int, rows: int
) -> torch.Tensor:
    """Rows ``start : start + rows`` of ``project_back(low)`` for this rank's ``low`` (the whole
    ``R``-shaped tensor when left, its rows when right): ``P[rows] X`` or ``X Pᵀ``, local."""
    if is_left(shape):
        return basis[start : start + rows] @ low
    return low @ basis.t()


def channel_scaling(
    adam_low: torch.Tensor,
    low: torch.Tensor,
    shape: torch.Size | tuple[int, ...],
    per_channel: bool = True,
    norm_of: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Fira/APOLLO factor ``‖Adam(R)_j‖ / ‖R_j‖``, shaped to broadcast against the full gradient.

    The channels are the larger side's rows/columns (the ones ``R`` keeps): columns when the basis
    is on the left, rows when it is on the right. ``per_channel=False`` gives APOLLO-Mini's single
    tensor-wise factor; ``norm_of`` computes its two norms when ``R`` is a row shard (the global
    norm, module docstring). ``shape`` is the gradient's global shape.
    """
    if not per_channel:
        if norm_of is not None:
            return norm_of(adam_low) / (norm_of(low) + NORM_EPS)
        return adam_low.norm() / (low.norm() + NORM_EPS)
    if is_left(shape):
        return adam_low.norm(dim=0) / (low.norm(dim=0) + NORM_EPS)  # (n,) broadcasts over rows
    return (adam_low.norm(dim=1) / (low.norm(dim=1) + NORM_EPS)).unsqueeze(1)  # (m, 1)


def limit_norm_growth(
    update: torch.Tensor,
    previous_norm: torch.Tensor,
    max_ratio: float = 1.01,
    norm_of: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Fira's norm-growth limiter: shrink ``update`` so ``‖update‖ ≤ max_ratio · previous``.

    ``update`` is scaled in place (it is a full-size temporary) and returned. ``previous_norm`` is
    a 0-dim tensor updated in place to the norm actually applied; ``0`` means "no history" (first
    step, or after a momentum reset) and lets the update through unchanged. Tensor ops only, so no
    host-device synchronisation. ``norm_of``: the global norm when ``update`` is a row shard.
    """
    norm = update.norm() if norm_of is None else norm_of(update)
    ratio = torch.clamp(norm / (previous_norm + NORM_EPS), min=max_ratio) / max_ratio
    limiter = torch.where(previous_norm > 0, ratio, torch.ones_like(ratio))
    previous_norm.copy_(norm / limiter)
    return update.div_(limiter)


def projector_refresh_due(p: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> bool:
    """Whether the next step of ``p`` recomputes its projection basis: its first step, and every
    ``update_proj_gap`` steps of the parameter's own clock (``total_step``). No side effect: the
    projected DDP communication hook asks it before the optimizer steps."""
    if p.dim() != 2 or group["projection"] is None:
        return False
    return "projector" not in state or state["total_step"] % group["update_proj_gap"] == 0


def new_basis(
    kind: str,
    grad: torch.Tensor,
    shape: torch.Size | tuple[int, ...],
    rank: int,
    *,
    seed: tuple[int, ...],
    oversample: int,
    power_iters: int,
) -> torch.Tensor:
    """A new ``(min(m, n), r)`` basis for a parameter of ``shape``: ``"svd"`` and ``"randomized"``
    from its whole gradient ``grad``; ``"random"`` (APOLLO) from ``seed`` alone, on ``grad``'s
    device. ``seed``: ``(seed, parameter index, refresh count)``."""
    if kind == "svd":
        return svd_basis(grad, rank)
    if kind == "randomized":
        return randomized_basis(grad, rank, seed=seed, oversample=oversample, power_iters=power_iters)
    return gaussian_projection(tuple(shape), rank, seed=seed, device=grad.device)


def apollo_update(
    grad: torch.Tensor,
    direction: torch.Tensor,
    low: torch.Tensor,
    shape: torch.Size | tuple[int, ...],
    limiter_norm: torch.Tensor,
    *,
    per_channel: bool,
    scale: float,
    norm_of: Callable[[torch.Tensor], torch.Tensor] | None = None,
    limiter_norm_of: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """APOLLO's update ``scale · limit(G · ‖Adam(R)_j‖ / ‖R_j‖)``, a new tensor shaped like ``grad``.

    ``direction`` is Adam's direction on ``low = R``; ``per_channel=False`` is APOLLO-Mini's
    tensor-wise factor; ``limiter_norm`` the norm-growth limiter's state (updated in place).
    APOLLO multiplies by ``sqrt(scale)``; here ``scale`` means the same in every mode, so APOLLO's
    ``scale=S`` is ``scale=sqrt(S)`` here. Row shards (FSDP2): ``norm_of`` gives the tensor-wise
    norms of a row-sharded ``R``, ``limiter_norm_of`` the whole update's norm.
    """
    scaled = grad * channel_scaling(direction, low, shape, per_channel=per_channel, norm_of=norm_of)
    return limit_norm_growth(scaled, limiter_norm, norm_of=limiter_norm_of).mul_(scale)
