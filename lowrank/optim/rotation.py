"""Carrying Adam's moments into new factor coordinates, the alternative to resetting them.

After a refactorization (``B' = B R``, ``A' = R⁻¹A``: :func:`lowrank.linalg.balanced_factors`) a
factor's gradient in the new coordinates is a fixed linear map of the old one: ``G' = G T`` for
``B`` (``T = R⁻ᵀ`` mixes the r columns) and ``G' = T G`` for ``A`` (``T = Rᵀ`` mixes the r rows),
:func:`lowrank.linalg.refactorization_maps`. So:

* the **first moment** ``m``, a weighted sum of past gradients, maps exactly: ``m' = m T``;
* the **second moment** ``v``, a weighted sum of their elementwise squares, has no exact image:
  ``(G T)²`` involves the products ``G_ik G_il`` whose average Adam never kept. Treating the old
  coordinates' gradients as uncorrelated gives the diagonal of the mapped second-moment matrix,
  ``v' = v (T∘T)``: exact when ``T`` is a scaled permutation, always non-negative, and on the same
  scale as the gradients the new coordinates will see.

Bias correction goes on: both maps are linear in the stored (uncorrected) averages. This is the
"keep ``v`` by rotating it into the new basis" remedy for the ``sign(g)``-sized first updates
after a full momentum reset (issue 21; ``benchmarks/diagnose_restarts.py``): reset ``m`` and carry
``v`` (``restarts.reset_moments: first`` with ``restarts.rotate_moments: true``).
"""

from __future__ import annotations

import torch

__all__ = ["rotate_moment"]


def rotate_moment(moment: torch.Tensor, transform: torch.Tensor, dim: int, *, squared: bool = False) -> torch.Tensor:
    """``moment`` of a factor in the coordinates where its gradient is ``G·T`` (``dim=1``, the factor's
    columns are the r mixed coordinates, as for ``B``) or ``T·G`` (``dim=0``, its rows, as for ``A``).

    ``squared=False``: a first moment, mapped exactly. ``squared=True``: a second moment (elementwise
    squares), mapped by ``T∘T`` (the uncorrelated-coordinates approximation of the module docstring).
    Computed in ``transform``'s precision; returned as a new tensor in ``moment``'s dtype.
    """
    if moment.dim() != 2 or transform.dim() != 2 or transform.shape[0] != transform.shape[1]:
        raise ValueError(f"rotate_moment needs a 2-D moment and a square map, got {tuple(moment.shape)} and "
                         f"{tuple(transform.shape)}")
    if dim not in (0, 1) or moment.shape[dim] != transform.shape[0]:
        raise ValueError(f"rotate_moment: the map is {transform.shape[0]}×{transform.shape[0]} but the moment's "
                         f"dim {dim} has {moment.shape[dim] if dim in (0, 1) else 'no'} entries")
    weights = transform.square() if squared else transform
    value = moment.to(transform.dtype)
    rotated = value @ weights if dim == 1 else weights @ value
    return rotated.to(moment.dtype)
