r"""FSDP2 shard arithmetic for the optimizer: where a parameter's local rows sit and the few
collectives a step needs on them. The optimizer asks :class:`RowShard` (``RowShard.of(p)`` is ``None``
for a plain tensor); it never inspects DTensors itself.

What ProjectedAdamW does on a row shard, technique by technique:

**FSDP2** (parameters that are ``DTensor``s sharded on dim 0 over a 1-D mesh, as
``torch.distributed.fsdp.fully_shard`` makes them; :mod:`lowrank.distributed.fsdp`). Each
rank steps its local rows ``G_i`` (``h = ceil(m/world)`` rows of ``G``) and keeps the state of
those rows, the layout's shard view (``state_layout(..., shard=(rank, world))``). Per mode:

* plain Adam, weight decay, resets, the warm-up ramp, SPAM clipping: elementwise, local, no
  communication. Moments shaped like ``p`` are DTensors sharded like ``p``.
* Stable-SPAM: ``max|G|`` is an all-reduce MAX of the shard maxima, ``‖G‖`` the square root of
  an all-reduce SUM of the shards' ``‖G_i‖²`` (one scalar collective each per step), so the
  statistics are the whole tensor's, as on one process.
* projection, between refreshes: right (``m ≥ n``) ``R_i = G_i P`` and ``G_i ← Adam(R)_i Pᵀ``
  are local (moments: a DTensor of ``R``'s rows); left (``m < n``) ``R = Σ_i P_iᵀ G_i`` is one
  all-reduce of ``r × n`` per step and ``R`` and its moments are replicated (plain tensors);
  projecting back, ``P_i Adam(R)``, is local.
* projection refresh (``"svd"``, ``"randomized"``): the basis needs the whole ``G``. Each
  matrix has an owner rank (its parameter index modulo the world size); the due matrices are
  refreshed ``world`` at a time: one gather of ``G`` to its owner per matrix, the owners
  factorize their matrices concurrently, and one broadcast of ``P`` (``min(m, n) × r`` fp32)
  per matrix, as Dion's and Muon's FSDP2 code distribute orthogonalisation over owners.
  ``P`` is stored as a plain tensor, replicated: it multiplies plain local shards (a
  replicated DTensor would only add dispatch and redistribution), every rank holds the same
  bits (broadcast from one owner), and DCP saves a plain tensor under one name once and loads
  it whole at any world size. ``"random"`` (APOLLO) draws ``P`` from the seed on every rank:
  no communication.
* Fira's residual ``G_i − P_i R`` (left) / ``G_i − R_i Pᵀ`` (right) is local; its per-channel
  factor ``‖Adam(R)_j‖/‖R_j‖`` is local too (right: rows of ``R``, each whole on its rank;
  left: columns of the replicated ``R``). The norm-growth limiter needs ``‖residual‖``: one
  scalar all-reduce. APOLLO: channel scaling local, as Fira's; APOLLO-Mini's tensor-wise
  factor on a right-projected (row-sharded) ``R`` needs two scalar all-reduces; its limiter one.
* sparse momentum: every rank draws the global subset of the whole tensor from
  ``(seed, parameter index, period)``, as on one process, and keeps the slice that falls in its
  rows (no communication; the subset does not depend on the world size, so a run resumes on
  any number of ranks). Over a left-projected ``R`` (replicated) the whole subset is kept.
* checkpoints: :meth:`ProjectedAdamW.state_dict` presents every tensor with its global shape: sharded
  DTensors for row-sharded moments, plain tensors for replicated ones, and a sparse moment
  (an uneven slice per rank) as the whole ``k``-vector, a DTensor sharded evenly (one
  all-gather per moment at save time); :meth:`ProjectedAdamW.load_state_dict` takes that, or a one-process
  state dict, and keeps the local part. DCP (:mod:`lowrank.distributed.dcp`) reshards it.
* not supported: ``state_bits`` (quantization blocks would straddle shards; a ``ValueError``),
  DTensors with other placements or a multi-dimensional mesh (HSDP, tensor parallel).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from .layout import MOMENT_KEYS, shard_range
from .projection import is_left


def is_sharded(t: torch.Tensor) -> bool:
    """Whether ``t`` is a DTensor (an FSDP2 parameter, or a moment sharded like one)."""
    return isinstance(t, DTensor)


def whole(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor a DTensor stands for (a collective); a plain tensor as it is."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (the tensor itself, so in-place updates land in it); else ``t``."""
    return t.to_local() if isinstance(t, DTensor) else t


@dataclass(frozen=True)
class RowShard:
    """Where an FSDP2 parameter's local rows sit: a DTensor sharded on dim 0 over a 1-D mesh,
    rows ``start : start + rows`` of a tensor of global ``shape`` on rank ``rank`` of ``world``,
    with the collectives the optimizer needs on that mesh's process group."""

    mesh: Any
    group: Any
    rank: int
    world: int
    start: int
    rows: int
    shape: torch.Size

    @classmethod
    def of(cls, p: torch.Tensor) -> RowShard | None:
        if not isinstance(p, DTensor):
            return None
        mesh = p.device_mesh
        if mesh.ndim != 1 or tuple(p.placements) != (Shard(0),) or p.dim() == 0:
            raise ValueError(
                f"ProjectedAdamW steps DTensor parameters sharded on dim 0 over a 1-D device mesh (FSDP2's fully_shard); "
                f"got placements {tuple(p.placements)} on a {mesh.ndim}-D mesh (HSDP, tensor parallelism are not supported)"
            )
        rank, world = mesh.get_local_rank(), mesh.size()
        start, rows = shard_range(p.shape[0], rank, world)
        if p.to_local().shape[0] != rows:
            raise ValueError(f"a DTensor parameter of shape {tuple(p.shape)} holds {p.to_local().shape[0]} rows on rank {rank} "
                             f"of {world}, not {rows}: only torch.chunk's even split (Shard(0)) is supported")
        return cls(mesh, mesh.get_group(), rank, world, start, rows, p.shape)

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce SUM of ``t`` in place; returns ``t``."""
        dist.all_reduce(t, group=self.group)
        return t

    def norm(self, t: torch.Tensor) -> torch.Tensor:
        """``‖T‖`` of the whole tensor whose row shard ``t`` is: ``sqrt(Σ_ranks ‖t‖²)`` (one scalar all-reduce)."""
        squared = torch.linalg.vector_norm(t).square()
        return self.sum_(squared).sqrt()

    def max(self, magnitude: torch.Tensor) -> torch.Tensor:
        """``max`` of the whole tensor whose row shard ``magnitude`` (≥ 0) is (one scalar all-reduce MAX)."""
        local = magnitude.max() if magnitude.numel() else magnitude.new_zeros(())
        dist.all_reduce(local, op=dist.ReduceOp.MAX, group=self.group)
        return local

    def dtensor(self, local: torch.Tensor, shape: tuple[int, ...]) -> DTensor:
        """``local`` as this rank's rows of a DTensor of global ``shape`` sharded like the parameter."""
        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(local, self.mesh, [Shard(0)], run_check=False, shape=torch.Size(shape), stride=stride)

    def gather_rows(self, local: torch.Tensor, owner: int) -> torch.Tensor | None:
        """The whole tensor on rank ``owner`` (``None`` elsewhere) from every rank's rows: one gather
        of ``ceil(m / world)`` rows per rank (padded, as the collective needs equal sizes)."""
        chunk = -(-self.shape[0] // self.world)
        send = local
        if local.shape[0] != chunk:
            send = torch.cat([local, local.new_zeros(chunk - local.shape[0], *local.shape[1:])])
        received = [torch.empty_like(send) for _ in range(self.world)] if self.rank == owner else None
        dist.gather(send.contiguous(), received, group=self.group, group_dst=owner)
        return torch.cat(received)[: self.shape[0]] if received is not None else None

    def broadcast(self, t: torch.Tensor, owner: int) -> torch.Tensor:
        dist.broadcast(t, group=self.group, group_src=owner)
        return t

    def slice_bounds(self, indices: torch.Tensor, numel: int) -> list[int]:
        """Positions in the sorted flat ``indices`` (of a tensor of ``numel`` entries with this
        parameter's rows) where each rank's rows begin, then ``len(indices)``: rank ``i`` keeps
        ``indices[b[i] : b[i + 1]]``."""
        row = numel // self.shape[0]
        edges = [shard_range(self.shape[0], rank, self.world)[0] * row for rank in range(self.world)]
        edges = torch.tensor(edges, dtype=indices.dtype, device=indices.device)
        return torch.searchsorted(indices, edges).tolist() + [indices.numel()]

    def join_slices(self, local: torch.Tensor, bounds: list[int]) -> DTensor:
        """The whole vector whose rank-``i`` slice is ``[bounds[i], bounds[i + 1])`` (``local`` here),
        as a DTensor sharded evenly on dim 0: one all-gather, padded to the longest slice."""
        sizes = [bounds[rank + 1] - bounds[rank] for rank in range(self.world)]
        width = max(sizes)
        send = torch.cat([local, local.new_zeros(width - local.numel())]) if local.numel() != width else local
        received = [torch.empty_like(send) for _ in range(self.world)]
        dist.all_gather(received, send.contiguous(), group=self.group)
        whole = torch.cat([part[:size] for part, size in zip(received, sizes)])
        return distribute_tensor(whole, self.mesh, [Shard(0)], src_data_rank=None)

    def rows_of(self, value: torch.Tensor, device: torch.device) -> DTensor:
        """``value`` (a whole tensor, or a DTensor placed otherwise) as a DTensor sharded by rows
        like the parameter: how a loaded moment that follows the parameter's rows is held."""
        if not isinstance(value, DTensor):
            return distribute_tensor(value.to(device), self.mesh, [Shard(0)], src_data_rank=None)
        if tuple(value.placements) != (Shard(0),):
            return value.redistribute(self.mesh, [Shard(0)])
        return value


# ---------------------------------------------------------------------- where each state tensor lives


def replicated_moments(shape: torch.Size, group: dict[str, Any]) -> bool:
    """The moments are of a left-projected ``R = PᵀG``: all-reduced, whole on every rank."""
    return len(shape) == 2 and group["projection"] is not None and is_left(shape)


def sparse_rows(shape: torch.Size, group: dict[str, Any]) -> bool:
    """Sparse moments over a row-sharded source: each rank keeps its slice of the subset."""
    return len(shape) == 2 and group["density"] < 1.0 and not replicated_moments(shape, group)


def dense_rows(shape: torch.Size, group: dict[str, Any]) -> bool:
    """Dense moments that follow the parameter's rows (shaped like it, or like ``G P``)."""
    return not replicated_moments(shape, group) and not (len(shape) == 2 and group["density"] < 1.0)


def resize_slice_(state: dict[str, Any], shape: torch.Size, dtype: torch.dtype, device: torch.device) -> None:
    """Sparse moments over a row-sharded source: this rank's slice of the subset changes size with
    the period. The moments are zero at a new period (a reset), so a new size is allocated as zeros
    (``dtype``: the state dtype, for a moment not allocated yet)."""
    for key in MOMENT_KEYS:
        if key in state and tuple(state[key].shape) != tuple(shape):
            state[key] = torch.zeros(shape, dtype=state[key].dtype, device=state[key].device)
        elif key not in state:
            state[key] = torch.zeros(shape, dtype=dtype, device=device)


def hold_local_(
    state: dict[str, Any],
    shape: torch.Size,
    group: dict[str, Any],
    shard: RowShard,
    device: torch.device,
    subset_numel: int,
    subset_bounds: Callable[[], list[int]],
) -> None:
    """After a load: keep of one parameter's ``state`` what this rank holds (its rows of a
    row-sharded moment, its slice of a sparse one of ``subset_numel`` entries, where
    ``subset_bounds()`` gives every rank's slice, and all of a replicated tensor), whether the
    state came from ``state_dict()`` on any number of ranks (via DCP) or from one process."""
    for key, value in list(state.items()):
        if not torch.is_tensor(value):
            continue
        if key in MOMENT_KEYS and sparse_rows(shape, group):
            full = whole(value)
            if full.numel() == subset_numel:
                bounds = subset_bounds()
                value = full[bounds[shard.rank] : bounds[shard.rank + 1]].clone()
        elif key in MOMENT_KEYS and dense_rows(shape, group):
            value = shard.rows_of(value, device)
        else:
            value = whole(value)
        state[key] = value
