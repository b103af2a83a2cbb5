"""Sparse momentum (SPAM, Huang et al. 2025, arXiv 2501.06842): moments for a random subset only.

For a moment source ``X`` (the gradient, or the projected ``R``) of ``N`` entries and a density
``d``, Adam keeps moments for ``k = round(d·N)`` entries drawn uniformly without replacement;
the other entries get no Adam update in that period (weight decay still applies to them)::

    I = subset(seed, parameter index, period)      (sorted flat indices, |I| = k)
    x = X.flat[I]  →  Adam on x  →  update.flat[I] += Adam(x),  0 elsewhere

A period ends at a momentum reset (:mod:`lowrank.optim.reset`), which draws a new subset. The
subset is a function of ``(seed, parameter index, period)`` (:func:`lowrank.seeding.sample_subset`):
no ``m × n`` mask is stored, every DDP rank draws the same one, and a resumed run redraws it.
Under FSDP2 each rank keeps the slice of the subset that falls in its rows (:func:`local_slice`).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..seeding import STREAM_SUBSET, sample_subset, subset_size
from . import projection as proj
from .shard import RowShard


def source_numel(shape: torch.Size | tuple[int, ...], numel: int, group: dict[str, Any]) -> int:
    """Entries of what sparse momentum subsamples: the parameter's ``numel``, or the projected ``R``'s."""
    if group["projection"] is None:
        return numel
    r = proj.effective_rank(shape, group["rank"])
    return r * (shape[1] if proj.is_left(shape) else shape[0])


def draw_subset(numel: int, density: float, *, seed: int, index: int, period: int,
                device: torch.device | str) -> torch.Tensor:
    """The sorted flat indices of period ``period``'s subset of ``numel`` entries for the
    parameter at position ``index`` (the same on every process)."""
    k = subset_size(numel, density)
    return sample_subset(numel, k, seed=(seed, index, period, STREAM_SUBSET), device=device)


def local_slice(indices: torch.Tensor, numel: int, shard: RowShard) -> torch.Tensor:
    """This rank's part of a subset of a row-sharded source of ``numel`` entries, as flat indices
    into its own rows (their concatenation over the ranks is the whole subset)."""
    bounds = shard.slice_bounds(indices, numel)
    offset = shard.start * (numel // shard.shape[0])
    return indices[bounds[shard.rank] : bounds[shard.rank + 1]] - offset


def gather(source: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``X.flat[I]``: the entries that have moments."""
    return source.reshape(-1).index_select(0, indices)


def scatter(values: torch.Tensor, indices: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """A dense tensor of ``shape``, ``values`` at ``indices`` and zero elsewhere."""
    dense = torch.zeros(math.prod(shape), dtype=values.dtype, device=values.device)
    dense.index_add_(0, indices, values)
    return dense.view(shape)


def apply_(param: torch.Tensor, indices: torch.Tensor, direction: torch.Tensor, step_size: float) -> None:
    """``p.flat[I] −= step_size · direction`` in place: no dense ``m × n`` temporary (``param``
    contiguous)."""
    param.view(-1).index_add_(0, indices, direction.to(param.dtype), alpha=-step_size)
