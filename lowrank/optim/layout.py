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
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from ..seeding import index_dtype, subset_size
from .projection import effective_rank, is_left

__all__ = ["KINDS", "MOMENT_KEYS", "ParamStateLayout", "TensorSpec", "state_layout", "torch_adamw_state_layout"]

# The groups of state tensors, as ``MemoryEstimate.optimizer_detail`` reports them.
KINDS = ("moments", "projectors", "scalars")
MOMENT_KEYS = ("exp_avg", "exp_avg_sq")

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


def state_layout(shape: tuple[int, ...], dtype: torch.dtype, group: Mapping[str, Any]) -> ParamStateLayout:
    """``ProjectedAdamW``'s state for a parameter of ``shape`` and ``dtype`` in ``group``.

    ``group`` is a parameter-group dict with every option present (as in
    ``optimizer.param_groups``). The rules are in the module docstring.
    """
    shape = tuple(shape)
    state_dtype = group["state_dtype"] or dtype
    matrix = len(shape) == 2
    kind = group["projection"] if matrix else None
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
        outside["subset_indices"] = TensorSpec((k,), index_dtype(numel))
        moment_shape = (k,)
    scalars: dict[str, TensorSpec] = {}
    if kind == "random" or (kind in ("svd", "randomized") and group["residual"] == "fira"):
        scalars["limiter_norm"] = _scalar()
    if group["adaptive_clip"]:
        scalars["max_abs_avg"] = _scalar()
    if group["norm_scaling"]:
        scalars["norm_avg"] = _scalar()
        scalars["norm_sq_avg"] = _scalar()
    moments = {key: TensorSpec(moment_shape, state_dtype) for key in MOMENT_KEYS}
    return ParamStateLayout(moments=moments, projectors=projectors, scalars=scalars, outside=outside)


def torch_adamw_state_layout(shape: tuple[int, ...], dtype: torch.dtype) -> ParamStateLayout:
    """``torch.optim.AdamW``'s state (``amsgrad=False``) for a parameter of ``shape`` and ``dtype``."""
    moments = {key: TensorSpec(tuple(shape), dtype) for key in MOMENT_KEYS}
    return ParamStateLayout(moments=moments, scalars={"step": _scalar()})
