"""The step's working set: the bytes one parameter's update allocates for itself, on top of the
parameter, its gradient and its optimizer state, as the update functions allocate them.

This is what the memory estimate (:mod:`lowrank.memory.estimate`) adds to the model state for the
optimizer step: with a per-parameter step only one parameter's temporaries exist at a time, so the
step costs the largest parameter's working set; ``torch.optim.AdamW(foreach=True)`` allocates its
denominators for a whole parameter group at once. Each term below names the line that allocates
it, so a change of the update functions shows here (``tests/test_working_set.py`` measures every
optimizer mode against these figures with the allocator's own events).

``ProjectedAdamW`` (:func:`projected_adamw_step_bytes`), for a parameter of ``N`` entries (its
local rows under FSDP2), its projected gradient ``R`` of ``N_R`` entries (``N`` unprojected), and
moments of ``K`` entries (``N_R``, or the sparse subset ``k``), each temporary in the step dtype
(``e`` bytes: the state dtype, or fp32 when the step runs in fp32 from bf16 storage)::

    the step in fp32 from bf16 storage   2·4N      value copy and gradient copy (precision.step_from_bf16)
    gradient cast to the step dtype        e·N      when it arrives in another dtype (_prepare)
    Stable-SPAM                            e·N      the rescaled gradient (spikes.stable_spam), 3e·N + N while rescaling
    projection                             e·N_R    R = PᵀG (projection.project)
    sparse momentum                        e·K      R.flat[I] (sparse.gather)
    quantized moments                      2·4K     m and v decoded to fp32 (lowbit.decode_state)
    SPAM clip                              2e·K     its bound and the clipped copy (spikes.spam_clip)
    Adam's direction                       e·K      sqrt(v) + eps, divided in place (adam.adam_direction)
    sparse, projected                      e·N_R    the direction scattered to R's shape (sparse.scatter)
    projected back (GaLore, Fira)          e·N      P·D (projection.project_back)
    Fira's residual                        e·N      G − P PᵀG (fira.fira_residual)
    APOLLO                                 e·N      G · scaling, limited in place (projection.apollo_update)

All of these are alive at once when the update is added to the parameter, so their sum is the
step's peak, with three exceptions:

* a step that refreshes an ``"svd"`` projector first takes the thin SVD of the whole ``m × n``
  gradient, ``4·(mn + s(m + n))`` with ``s = min(m, n)``: the copy LAPACK works on, ``U`` and
  ``Vᵀ`` (projection.svd_basis); for GaLore that is the run's peak every ``update_proj_gap`` steps;
* a step that draws a new sparse-momentum subset (each reset period) holds a bool mask of ``N_R``
  entries and the int64 and int32 indices, ``12k`` (the int64 draws before them are at most
  ``8k`` plus a smaller second round; seeding.sample_subset), beside ``R``;
* the block codec of quantized moments works a piece of at most ``2²²`` entries at a time
  (:data:`lowbit.PIECE_NUMEL`) and allocates :data:`CODEC_BYTES_PER_ENTRY` per entry of a piece
  while re-encoding, plus 4 bytes per block of the whole moment, after the direction and the
  update are freed.

A stochastic rounding pass back to bf16 then holds the fp32 copy and
:data:`ROUNDING_BYTES_PER_ENTRY` per entry of a :data:`lowrank.precision.ROUND_CHUNK`-entry chunk
(:func:`lowrank.precision.stochastic_round_to_bf16`).

``Muon`` (:func:`muon_step_bytes`) on an ``m × n`` matrix, ``s = min(m, n)``: the Nesterov
direction (fp32, ``4N``), Newton–Schulz's bf16 iterate twice (old and new, ``2·2N``), its two
``s × s`` bf16 products and the BLAS's packing of them (:data:`BLAS_PACKING_BYTES`), then the bf16
result and its fp32 cast (``2N + 4N``) beside the direction.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ..precision import ROUND_CHUNK
from ..seeding import subset_size
from . import lowbit
from .layout import local_numel
from .projection import effective_rank, is_left

__all__ = ["CODEC_BYTES_PER_ENTRY", "ROUNDING_BYTES_PER_ENTRY", "bf16_step_bytes", "muon_step_bytes",
           "projected_adamw_step_bytes", "torch_adamw_foreach_bytes"]

CODEC_BYTES_PER_ENTRY = 13
"""Temporaries of the block codec per entry of a piece while encoding: the padded fp32 piece, the
scaled piece and its int32 bucket indices (``4 + 4 + 4``) and the uint8 codes
(:func:`lowrank.optim.lowbit.quantize_blockwise`)."""

ROUNDING_BYTES_PER_ENTRY = 15
"""Stochastic rounding per entry of a chunk: the int32 noise, the summed bits, the finite mask,
the selected fp32 values and their bf16 copy (``4 + 4 + 1 + 4 + 2``;
:func:`lowrank.precision.stochastic_round_to_bf16`)."""

BLAS_PACKING_BYTES = 5
"""Newton–Schulz's bf16 products of an ``s × s`` Gram matrix: the CPU BLAS packs them into a
workspace of about ``1.25·s²`` bytes (measured: 1 MiB at s = 1024, 5 MiB at 2048; none below);
counted as ``BLAS_PACKING_BYTES / 4`` bytes per entry of ``s × s``."""



def projected_adamw_step_bytes(shape: tuple[int, ...], group: Mapping[str, Any], *, step_dtype: torch.dtype,
                               grad_dtype: torch.dtype | None = None, shard: tuple[int, int] | None = None) -> int:
    """Bytes ``ProjectedAdamW.step_param`` allocates for one parameter of ``shape`` in ``group``
    (the module docstring's table, without the bf16 copies: :func:`bf16_step_bytes`).

    ``step_dtype``: the dtype the update runs in (the state dtype, else the parameter's; fp32 from
    bf16 storage); ``grad_dtype``: the gradient's when it differs (cast first);
    ``shard=(rank, world)``: one rank's rows under FSDP2 (the moments as :func:`~.layout.state_layout`
    shards them)."""
    shape = tuple(shape)
    e = (group["state_dtype"] or step_dtype).itemsize
    n = local_numel(shape, *shard) if shard is not None else math.prod(shape)
    matrix = len(shape) == 2
    kind = group["projection"] if matrix else None
    n_low = n
    if kind is not None:
        r = effective_rank(shape, group["rank"])
        n_low = r * shape[1] if is_left(shape) else (n // shape[1]) * r
    sparse = matrix and group["density"] < 1.0
    k = subset_size(n_low, group["density"]) if sparse else n_low
    quantized = lowbit.is_quantized(k, group.get("state_bits"))

    before = 0  # alive through the whole update
    if grad_dtype is not None and grad_dtype != (group["state_dtype"] or step_dtype):
        before += e * n
    spikes = 0
    if group["adaptive_clip"] or group["norm_scaling"]:
        before += e * n  # the rescaled gradient
        spikes = 3 * e * n + n  # while rescaling: |g|, a quotient, the result and a bool mask
    if kind is not None:
        before += e * n_low
    if sparse:
        before += e * k
    if quantized:
        before += 2 * 4 * k  # m and v decoded
    update = e * k  # Adam's direction
    if group["spike_threshold"] > 0:
        update += 2 * e * k
    if sparse and kind is not None:
        update += e * n_low
    if kind in ("svd", "randomized"):
        update += e * n * (2 if group["residual"] == "fira" else 1)
    elif kind == "random":
        update += e * n
    codec = CODEC_BYTES_PER_ENTRY * min(k, lowbit.PIECE_NUMEL) + 4 * lowbit.num_blocks(k, group["state_bits"]) \
        if quantized else 0
    refresh = 0
    if kind == "svd":  # the whole gradient's thin SVD: its fp32 copy, U and Vᵀ (its owner's under FSDP2)
        rows, cols = shape
        refresh = 4 * (rows * cols + min(rows, cols) * (rows + cols))
    prepared = (e * n if grad_dtype is not None and grad_dtype != (group["state_dtype"] or step_dtype) else 0) \
        + (e * n if group["adaptive_clip"] or group["norm_scaling"] else 0)
    subset = 0
    if sparse:  # a new period's subset, beside R: seeding.sample_subset's mask, draws and indices
        subset = e * n_low * (kind is not None) + n_low + 12 * k
    return max(spikes, prepared + refresh, prepared + subset, before + max(update, codec))


def muon_step_bytes(shape: tuple[int, ...]) -> int:
    """Bytes ``Muon``'s update of one ``m × n`` matrix allocates (module docstring)."""
    n, s = math.prod(shape), min(shape)
    newton_schulz = 2 * 2 * n + 2 * 2 * s * s + BLAS_PACKING_BYTES * s * s // 4
    return 4 * n + max(newton_schulz, 2 * n + 4 * n)


def bf16_step_bytes(numel: int, storage: torch.dtype, rounding: str) -> tuple[int, int]:
    """``(during the update, while rounding back)``: what stepping a parameter of ``numel``
    entries stored in ``storage`` in fp32 adds (:func:`lowrank.precision.step_from_bf16`): the fp32
    copies of the value and of the gradient during the update, and the value's copy beside the
    rounding's chunk afterwards. Zero for fp32 storage."""
    if storage == torch.float32:
        return 0, 0
    rounding_bytes = ROUNDING_BYTES_PER_ENTRY * min(numel, ROUND_CHUNK) if rounding == "stochastic" else 0
    return 2 * 4 * numel, 4 * numel + rounding_bytes


def torch_adamw_foreach_bytes(groups: Iterable[Iterable[torch.Tensor]]) -> int:
    """``torch.optim.AdamW(foreach=True)``: ``sqrt(v)`` of every parameter of a group at once
    (``torch._foreach_sqrt``), the largest group's."""
    return max((sum(p.numel() * p.element_size() for p in params) for params in groups), default=0)
