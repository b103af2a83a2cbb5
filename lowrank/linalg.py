"""Pure tensor functions for low-rank factor algebra.

Everything here takes and returns plain tensors, so the layer classes stay thin and the math can
be tested (and reused by the optimizer and the memory profiler) on its own.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "work_dtype",
    "balanced_factors",
    "spectral_factors",
    "refactorization_maps",
    "kaiming_uniform_",
]


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Precision for factor algebra (QR, SVD, materialising ``B @ A``): fp64 stays fp64, every other
    dtype works in fp32 (QR and SVD have no half-precision kernels, and fp32 keeps a bf16 layer's
    round trip exact to ~1e-6)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def kaiming_uniform_(tensor: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``nn.Linear``'s default initialisation (Kaiming-uniform with ``a = sqrt(5)``), in place.

    Drawn on the CPU from ``generator`` and copied, so the values do not depend on the device.
    """
    fan_in = tensor.shape[1]
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    values = torch.empty(tensor.shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
    with torch.no_grad():
        tensor.copy_(values)
    return tensor


@torch.no_grad()
def balanced_factors(
    B: torch.Tensor, A: torch.Tensor, *, null_tolerance: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Balanced refactorization of the product ``B @ A`` without forming it.

    Glentis et al. 2025 (arXiv 2505.22922), "weight refactorization": write ``B A = U Σ Vᵀ`` and
    return ``B' = U Σ^½``, ``A' = Σ^½ Vᵀ``, so ``B'ᵀB' = A'A'ᵀ = Σ``. The SVD comes from thin QR
    of each factor and an SVD of the r×r core::

        B = Q_b R_b,  Aᵀ = Q_a R_a,  R_b R_aᵀ = U_c Σ V_cᵀ,  U = Q_b U_c,  V = Q_a V_c

    which costs ``O((m + n) r² + r³)`` instead of ``O(m n min(m, n))`` for the dense SVD.

    Directions whose singular value is numerically zero (below ``null_tolerance · σ_max``, e.g.
    the whole product when a ReLoRA layer has ``B = 0``) would come out with both factor rows
    zero, and then neither factor receives a gradient along them again: the layer silently loses
    rank for good. For those directions ``A'`` keeps a unit-scale row along ``v_i`` (the old
    A's average row norm) and ``B'`` keeps the exact (near-zero) remainder, so the product, and
    with it the layer's function, is unchanged while the direction stays trainable.

    Args:
        B: ``m × r`` left factor.
        A: ``r × n`` right factor.
        null_tolerance: relative threshold below which a singular value counts as zero.

    Returns:
        ``(B', A', σ)`` with ``B'``/``A'`` in the input dtype and ``σ`` (length r, descending,
        float32) the singular values of ``B @ A``.
    """
    if B.ndim != 2 or A.ndim != 2 or B.shape[1] != A.shape[0]:
        raise ValueError(f"balanced_factors needs B: m×r and A: r×n, got {tuple(B.shape)} and {tuple(A.shape)}")
    work = work_dtype(B.dtype)
    q_b, r_b = torch.linalg.qr(B.to(work))
    q_a, r_a = torch.linalg.qr(A.to(work).T)
    u_c, sigma, v_c_t = torch.linalg.svd(r_b @ r_a.T)
    u = q_b @ u_c
    v = q_a @ v_c_t.T

    root = sigma.sqrt()
    null = sigma <= null_tolerance * sigma.max().clamp_min(torch.finfo(work).tiny)
    if bool(null.any()):
        row_norm = A.to(work).norm(dim=1).mean()
        a_scale = torch.where(null, row_norm, root)
        b_scale = torch.where(null, sigma / a_scale.clamp_min(torch.finfo(work).tiny), root)
    else:
        a_scale = b_scale = root
    new_B = (u * b_scale).to(B.dtype)
    new_A = (a_scale[:, None] * v.T).to(A.dtype)
    return new_B, new_A, sigma.float()


@torch.no_grad()
def refactorization_maps(
    B: torch.Tensor, A: torch.Tensor, new_B: torch.Tensor, new_A: torch.Tensor, *, null_tolerance: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The r×r maps that carry the factors' gradients into the coordinates of a refactorization.

    A refactorization (:func:`balanced_factors`) replaces ``(B, A)`` by ``(B', A') = (B R, R⁻¹A)``
    with the same product. The loss depends on the factors through the product only, so by the
    chain rule ``∂L/∂B' = ∂L/∂B · R⁻ᵀ`` and ``∂L/∂A' = Rᵀ · ∂L/∂A``. ``R`` follows from the two
    pairs by least squares (``B R = B'`` and ``R A' = A``)::

        b_map = R⁻ᵀ = Bᵀ B' (B'ᵀ B')⁻¹        a_map = Rᵀ = (A' A'ᵀ)⁻¹ A' Aᵀ

    so no r×r inverse of ``R`` itself is needed and the maps hold for any refactorization, not only
    the balanced one (for which ``B'ᵀB' = A'A'ᵀ = Σ``).

    Defined only where ``R`` is invertible, i.e. ``B A`` has rank r: when either Gram matrix has an
    eigenvalue below ``null_tolerance`` times its largest (a direction of the product that is
    numerically zero, which :func:`balanced_factors` fills with a unit-scale row of ``A'``), the
    new coordinates do not determine the old ones and the result is ``None``.

    Returns:
        ``(b_map, a_map)`` in the factors' working precision (:func:`work_dtype`), or ``None``.
    """
    work = work_dtype(B.dtype)
    B, A, new_B, new_A = (t.to(work) for t in (B, A, new_B, new_A))
    gram_b, gram_a = new_B.T @ new_B, new_A @ new_A.T
    for gram in (gram_b, gram_a):
        eigenvalues = torch.linalg.eigvalsh(gram)
        if not bool(eigenvalues[0] > null_tolerance * eigenvalues[-1].clamp_min(torch.finfo(work).tiny)):
            return None
    b_map = torch.linalg.solve(gram_b, (B.T @ new_B).T).T.contiguous()  # (Bᵀ B') (B'ᵀB')⁻¹: the Gram is symmetric
    a_map = torch.linalg.solve(gram_a, new_A @ A.T)
    return b_map, a_map


@torch.no_grad()
def spectral_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``rank`` SVD of a dense ``m × n`` weight, split evenly: ``B = U√Σ``, ``A = √ΣVᵀ``.

    The "spectral" initialisation: start the factors at the best rank-r approximation of a
    freshly initialised (or pretrained) dense layer, already balanced.
    """
    work = work_dtype(weight.dtype)
    u, sigma, v_t = torch.linalg.svd(weight.to(work), full_matrices=False)
    root = sigma[:rank].sqrt()
    return (u[:, :rank] * root).to(weight.dtype), (root[:, None] * v_t[:rank]).to(weight.dtype)
