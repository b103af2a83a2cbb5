"""Which optimizer state tensors exist for one parameter: the documentation of the state format.

:func:`state_layout` is the single statement of ``ProjectedAdamW``'s state. The optimizer
allocates every state tensor from it (zeros of the stated shape and dtype, on the parameter's
device, the first time a key is needed) and the memory estimator
(:mod:`lowrank.memory.estimate`) sums it over the parameter groups without stepping. Counters
(``step``, ``total_step``, ``resets``, ``projector_updates``) are Python ints, not tensors, and
are not part of a layout.

``ProjectedAdamW``, for a parameter ``p`` of ``shape`` (``m × n`` when 2-D) and ``dtype`` in a
group with options ``group``; ``s = group["state_dtype"] or dtype``:

* **moments** ``exp_avg``, ``exp_avg_sq`` in ``s``, shaped

  - like ``p`` without projection (and always when ``p`` is not 2-D: projection and sparse
    momentum act on matrices only);
  - like the projected gradient ``R`` with ``projection`` set: ``r × n`` when ``m < n``, else
    ``m × r``, with ``r = effective_rank(shape, rank)`` (:mod:`lowrank.optim.projection`);
  - with sparse momentum (``density < 1``, 2-D): a flat vector of
    ``k = subset_size(numel, density)`` entries, ``numel`` being that of ``p`` or of ``R``.

  With ``state_bits`` b (8 or 4; ``None``, the default, keeps the above) a moment of ``N ≥ 4096``
  entries (:data:`lowrank.optim.lowbit.MIN_QUANTIZED_NUMEL`; ``N`` as above: ``p``'s, ``R``'s or
  ``k``) is stored block-wise quantized (:mod:`lowrank.optim.lowbit`; blocks of ``B = 256`` for
  8 bits, ``128`` for 4): ``exp_avg`` / ``exp_avg_sq`` become the flat ``uint8`` codes,
  ``(ceil(N·b/8),)``, and ``exp_avg_absmax`` / ``exp_avg_sq_absmax`` the fp32 block scales,
  ``(ceil(N/B),)``, both of kind "moments". Smaller moments stay in ``s``. A 4-bit moment whose
  ``N`` the block does not divide is a ``ValueError``. The code books are shared constants of
  the format (``lowbit.code_book``), not state.
* **projectors** ``projector``: the ``min(m, n) × r`` basis in ``s``, with ``projection`` set.
* **scalars**, 0-dim fp32: ``limiter_norm`` (the norm-growth limiter) with Fira's residual
  (``residual="fira"`` on ``"svd"``/``"randomized"``) or APOLLO's ``"random"`` projection;
  ``max_abs_avg`` with ``adaptive_clip``; ``norm_avg`` and ``norm_sq_avg`` with
  ``norm_scaling``.
* **outside** the state (not saved by ``state_dict()``, rebuilt from the seed when needed): with
  sparse momentum the sorted indices of the current subset, ``k`` entries of
  ``seeding.index_dtype(numel)`` (int32, 4 bytes each, whenever they fit).

``torch.optim.AdamW`` (:func:`torch_adamw_state_layout`; ``amsgrad=False``): ``exp_avg`` and
``exp_avg_sq`` shaped like ``p`` in ``p``'s dtype, and ``step`` as a 0-dim fp32 tensor.

**Shard view** (``shard=(rank, world)``): what one rank holds when ``p`` is sharded on dim 0 over
``world`` ranks, as FSDP2 (``torch.distributed.fsdp.fully_shard``) shards it (torch.chunk's
split, :func:`shard_range`), and ``ProjectedAdamW`` keeps the state of its local rows
(:mod:`lowrank.optim.shard`):

* moments shaped like ``p``, and the right-projected ``m × r`` moments (``R = G P`` has ``G``'s
  rows), have the rank's rows, ``(rows, ...)``;
* the left-projected ``r × n`` moments (``R = Pᵀ G`` is all-reduced), projectors and scalars are
  replicated: every rank holds all of them;
* sparse moments (and the index cache) hold the rank's slice of the global subset: for a
  row-sharded source ``round(k · rows / m)`` entries, the *expected* count (the slice of a random
  subset varies by about ``√k`` from period to period); over a left-projected ``R``, all ``k``.

Low-bit moments (``state_bits``) have no shard view (their 256-entry blocks would straddle shard
boundaries): a ``ValueError``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from ..seeding import index_dtype, subset_size
from . import lowbit
from .projection import effective_rank, is_left

__all__ = [
    "ABSMAX_KEYS",
    "KINDS",
    "MOMENT_KEYS",
    "MOMENT_SIGNED",
    "ParamStateLayout",
    "TensorSpec",
    "local_numel",
    "shard_range",
    "state_layout",
    "torch_adamw_state_layout",
]

# The groups of state tensors, as ``MemoryEstimate.optimizer_detail`` reports them.
KINDS = ("moments", "projectors", "scalars")
MOMENT_KEYS = ("exp_avg", "exp_avg_sq")
# With ``state_bits``: the block scales of each quantized moment, and which code book it uses
# (signed for ``m``, unsigned for ``v``).
ABSMAX_KEYS = {"exp_avg": "exp_avg_absmax", "exp_avg_sq": "exp_avg_sq_absmax"}
MOMENT_SIGNED = {"exp_avg": True, "exp_avg_sq": False}

_SCALAR_DTYPE = torch.float32


class TensorSpec(NamedTuple):
    """Shape and dtype of one tensor; unpacks as ``(shape, dtype)``."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    def numel(self) -> int:
        return math.prod(self.shape)

    def bytes(self) -> int:
        return self.numel() * self.dtype.itemsize


def _scalar() -> TensorSpec:
    return TensorSpec((), _SCALAR_DTYPE)


def _total(specs: Mapping[str, TensorSpec]) -> int:
    return sum(spec.bytes() for spec in specs.values())


@dataclass(frozen=True)
class ParamStateLayout:
    """Every state tensor of one parameter once it has stepped, by kind (see :data:`KINDS`), and
    the tensors the optimizer holds for it outside its state (``outside``)."""

    moments: dict[str, TensorSpec] = field(default_factory=dict)
    projectors: dict[str, TensorSpec] = field(default_factory=dict)
    scalars: dict[str, TensorSpec] = field(default_factory=dict)
    outside: dict[str, TensorSpec] = field(default_factory=dict)

    def tensors(self) -> dict[str, TensorSpec]:
        """Name → spec of every tensor in the state (what ``optimizer.state[p]`` holds)."""
        return {name: spec for kind in KINDS for name, spec in getattr(self, kind).items()}

    def bytes_by_kind(self) -> dict[str, int]:
        """``{"moments": ..., "projectors": ..., "scalars": ...}``, every kind present."""
        return {kind: _total(getattr(self, kind)) for kind in KINDS}

    def bytes(self) -> int:
        """Bytes of the state tensors (what ``state_dict()`` saves), without ``outside``."""
        return sum(self.bytes_by_kind().values())

    def outside_bytes(self) -> int:
        """Bytes held outside the state (the sparse-momentum index cache)."""
        return _total(self.outside)


@dataclass(frozen=True)
class StateBytes:
    """Bytes of optimizer state, as measured (``ProjectedAdamW.state_bytes()``, ``Muon.state_bytes()``).

    ``total`` and ``per_group`` count every tensor in ``optimizer.state`` (exactly what
    ``state_dict()`` saves; the few Python int counters per parameter are not counted).
    ``subset_cache`` is memory held outside the state: the sorted indices of the current
    sparse-momentum subsets (4 bytes per kept entry), rebuilt from the seed when needed.
    """

    total: int
    per_group: list[int]
    subset_cache: int


def shard_range(rows: int, rank: int, world: int) -> tuple[int, int]:
    """``(start, count)`` of the rows (dim-0 entries) that rank ``rank`` of ``world`` holds of a
    tensor with ``rows`` rows, split as FSDP2 / DTensor ``Shard(0)`` split it: torch.chunk's rule,
    ``ceil(rows / world)`` rows per rank from the first, so the last ranks may hold fewer or none."""
    if not 0 <= rank < world:
        raise ValueError(f"shard rank must be in [0, {world}), got {rank}")
    chunk = -(-rows // world)
    start = min(rank * chunk, rows)
    return start, min(rows, start + chunk) - start


def local_numel(shape: tuple[int, ...], rank: int, world: int) -> int:
    """Entries of rank ``rank``'s row shard of a tensor of ``shape`` over ``world`` ranks (FSDP2's dim-0 sharding)."""
    if not shape:
        return 1
    return shard_range(shape[0], rank, world)[1] * math.prod(shape[1:])


def state_layout(
    shape: tuple[int, ...], dtype: torch.dtype, group: Mapping[str, Any], shard: tuple[int, int] | None = None
) -> ParamStateLayout:
    """``ProjectedAdamW``'s state for a parameter of ``shape`` and ``dtype`` in ``group``.

    ``group`` is a parameter-group dict with every option present (as in
    ``optimizer.param_groups``). ``shard=(rank, world)``: the part one rank holds when the
    parameter (of global ``shape``) is sharded on dim 0 over ``world`` ranks (FSDP2), the
    module docstring's shard view; ``None``: the whole state. The rules are in the module docstring.
    """
    shape = tuple(shape)
    state_dtype = group["state_dtype"] or dtype
    matrix = len(shape) == 2
    kind = group["projection"] if matrix else None
    if shard is not None and group.get("state_bits") is not None:
        raise ValueError(f"state_bits={group['state_bits']} has no shard view: block-quantized moments are not supported "
                         "on FSDP2-sharded parameters (their blocks would straddle shard boundaries); use state_bits=None")
    # Under sharding, everything but a left-projected R (all-reduced, replicated) follows p's rows.
    local_rows = None
    if shard is not None and shape and not (kind is not None and is_left(shape)):
        local_rows = shard_range(shape[0], *shard)[1]
    moment_shape = shape
    projectors: dict[str, TensorSpec] = {}
    if kind is not None:
        r = effective_rank(shape, group["rank"])
        moment_shape = (r, shape[1]) if is_left(shape) else (shape[0], r)
        projectors["projector"] = TensorSpec((min(shape), r), state_dtype)
    outside: dict[str, TensorSpec] = {}
    if matrix and group["density"] < 1.0:
        numel = math.prod(moment_shape)
        k = subset_size(numel, group["density"])
        if local_rows is not None:
            k = round(k * local_rows / shape[0])  # the expected size of this rank's slice
        outside["subset_indices"] = TensorSpec((k,), index_dtype(numel))
        moment_shape = (k,)
    elif local_rows is not None:
        moment_shape = (local_rows, *moment_shape[1:])
    scalars: dict[str, TensorSpec] = {}
    if kind == "random" or (kind in ("svd", "randomized") and group["residual"] == "fira"):
        scalars["limiter_norm"] = _scalar()
    if group["adaptive_clip"]:
        scalars["max_abs_avg"] = _scalar()
    if group["norm_scaling"]:
        scalars["norm_avg"] = _scalar()
        scalars["norm_sq_avg"] = _scalar()
    moments = _moment_specs(shape, moment_shape, state_dtype, group.get("state_bits"))
    return ParamStateLayout(moments=moments, projectors=projectors, scalars=scalars, outside=outside)


def _moment_specs(
    shape: tuple[int, ...], moment_shape: tuple[int, ...], dtype: torch.dtype, bits: int | None
) -> dict[str, TensorSpec]:
    """Both moments of ``moment_shape``: in ``dtype``, or as codes and block scales (module docstring)."""
    numel = math.prod(moment_shape)
    if not lowbit.is_quantized(numel, bits):
        return {key: TensorSpec(moment_shape, dtype) for key in MOMENT_KEYS}
    try:
        lowbit.check_quantizable(numel, bits)
    except ValueError as error:
        raise ValueError(
            f"state_bits={bits} cannot store the moments of a parameter of shape {shape} ({numel} entries): "
            f"{error}; give it state_bits=8 in a group of its own, or a rank/density that makes them fit"
        ) from None
    specs = {}
    for key in MOMENT_KEYS:
        specs[key] = TensorSpec((lowbit.codes_numel(numel, bits),), torch.uint8)
        specs[ABSMAX_KEYS[key]] = TensorSpec((lowbit.num_blocks(numel, bits),), torch.float32)
    return specs


def torch_adamw_state_layout(
    shape: tuple[int, ...], dtype: torch.dtype, shard: tuple[int, int] | None = None
) -> ParamStateLayout:
    """``torch.optim.AdamW``'s state (``amsgrad=False``) for a parameter of ``shape`` and ``dtype``;
    ``shard=(rank, world)``: one rank's part under FSDP2 (the moments' local rows)."""
    shape = tuple(shape)
    if shard is not None and shape:
        shape = (shard_range(shape[0], *shard)[1], *shape[1:])
    moments = {key: TensorSpec(shape, dtype) for key in MOMENT_KEYS}
    return ParamStateLayout(moments=moments, scalars={"step": _scalar()})


def muon_state_layout(shape: tuple[int, ...], dtype: torch.dtype, group: Mapping[str, Any]) -> ParamStateLayout:
    """``lowrank.optim.Muon``'s state for a parameter of ``shape`` and ``dtype`` in a Muon group
    (``use_muon=True``): the moment ``momentum_buffer``, shaped like ``p``, in
    ``group["state_dtype"] or dtype``; the counter ``step`` is a Python int. Parameters in Muon's
    AdamW groups (``use_muon=False``) have ProjectedAdamW's state, :func:`state_layout`.
    """
    return ParamStateLayout(moments={"momentum_buffer": TensorSpec(tuple(shape), group.get("state_dtype") or dtype)})


__all__ += ["muon_state_layout"]
