"""Quantization formats as pure tensor functions: integer (INT8/4/3/2) and FP4 (E1M2, E2M1).

Every format quantizes groups of ``g`` consecutive entries along the last dimension, each group
with its own scale (and zero point): ``group_size=g`` (``g`` must divide the last dimension),
``-1`` (one group per row: per-channel for a weight ``m × n``, per-token for activations) or
``None`` (one group for the whole tensor). With ``flat=True`` the groups are ``g`` consecutive
entries of the row-major flattened tensor instead, so a group may span rows (Stable-SPAM's
quantizers: ``x.reshape(-1, g)``; ``g`` must divide the number of entries): that is how its
INT4/FP4 training quantizes an MLP's 688-wide down projection or a rank-64 factor with groups of
256. Arithmetic runs in float32 whatever the input dtype;
:func:`fake_quantize` returns the input's shape and dtype.

Formats (``b`` bits, a group ``x``; ``round`` is round-half-to-even, as ``torch.round``):

* **INT, symmetric (absmax)**::

      s = max|x| / (2^(b-1) - 1)     q = clamp(round(x / s), -(2^(b-1) - 1), 2^(b-1) - 1)     x̂ = s·q

  ``2^b − 1`` levels (the code ``−2^(b-1)`` is never produced, so the grid is symmetric; INT2
  symmetric is ternary, use ``symmetric=False`` for four levels). Source: absmax quantization
  (Dettmers et al. 2022, LLM.int8(), arXiv 2208.07339, section 3.1); Stable-SPAM's activation
  quantizer (``utils/dummy_quant.py``, ``fake_topk_quantize``: ``x·(2^(b-1)−1)/max|x|``).
  Equals torchao's ``MappingType.SYMMETRIC`` with ``quant_min = −quant_max = −(2^(b-1) − 1)``.

* **INT, asymmetric (min–max with a zero point)**::

      lo = min(min x, 0)   hi = max(max x, 0)   s = (hi - lo) / (2^b - 1)   z = clamp(-round(lo / s), 0, 2^b - 1)
      q = clamp(round(x / s) + z, 0, 2^b - 1)   x̂ = s·(q - z)

  Source: Stable-SPAM's weight quantizer (``utils/act_weight_quantization.py``,
  ``_quantize_tensor``: ``q = clamp(round(w/s) + z, 0, 15)``, groups of 256), which is
  torchao's ``MappingType.ASYMMETRIC`` except that torchao (and we) widen the range to include 0.
  The two agree on every group that holds both signs (every weight group in practice); on a
  one-signed group Stable-SPAM's formula clips everything to one code (``[1, 2]`` → all ``1.0``).

* **Stochastic rounding** (``stochastic=True``, integer and FP formats): instead of ``round``,
  round down or up to the two neighbouring grid points ``a ≤ y < b`` with ``P(b) = (y − a)/(b − a)``,
  so ``E[x̂] = x`` for every entry inside the grid (Gupta et al. 2015, "Deep learning with limited
  numerical precision", arXiv 1502.02551). For integers that is ``floor(y + u)``, ``u ~ U[0, 1)``;
  Stable-SPAM writes ``round(y + u − ½)``, the same distribution. The uniforms come from a
  caller's ``torch.Generator`` (or are passed in as ``noise``): no global random state is read.
  The grid covers each group exactly for the symmetric and FP4 formats; for the asymmetric one
  the rounded zero point can leave up to half a step of the group outside
  ``[(qmin − z)s, (qmax − z)s]``, and those entries are clipped to the end code (biased by at most
  half a step, as round-to-nearest would round them), so the scale and zero are those of RTN.

* **FP4 E2M1** (OCP Microscaling Formats (MX) Specification v1.0, section 5.3.3): sign, 2
  exponent bits (bias 1), 1 mantissa bit, no Inf/NaN; magnitudes ``{0, 0.5, 1, 1.5, 2, 3, 4, 6}``
  (:data:`E2M1_GRID`); code ``S EE M`` = ``sign << 3 | index into the grid``, as torchao's
  ``f32_to_f4_unpacked`` stores it.

* **FP4 E1M2** (derived, not in the MX spec): sign, 1 exponent bit, 2 mantissa bits, bias 1,
  as Stable-SPAM calls it (``fp4_fake_quantize(e=1, m=2, b=1)``): ``E = 0`` is subnormal,
  ``2^(1−1)·M/4`` = ``{0, 0.25, 0.5, 0.75}``; ``E = 1`` is ``2^(1−1)·(1 + M/4)`` =
  ``{1, 1.25, 1.5, 1.75}`` (:data:`E1M2_GRID`; bias 0 gives the same grid times 2, identical after
  the group scale). The grid is uniform, so fake E1M2 with an absmax scale equals symmetric INT4
  fake quantization (levels ``k/7·max|x|``, ``k = −7..7``); only the code layout differs. Note:
  Stable-SPAM's released ``utils/act_weight_fp4.py`` evaluates LLM-FP4's formula (Liu et al. 2023,
  arXiv 2310.16836, eq. 2–3) with ``b = 1``; its clamp ``log_v − m ≥ 1 − m`` with ``log_v ≤ 1``
  makes the step constant, so its output is the 9-level grid ``{0, ±¼, ±½, ±¾, ±1}·max|x|``, not
  E1M2. We implement the E1M2 grid its parameters name.

  Both FP4 formats use one real-valued scale per group mapping the group's absmax onto the grid's
  maximum, ``s = max|x| / grid_max``, and round to the nearest grid point with ties to the even
  code (the MX spec's roundTiesToEven; torchao does the same). The MX spec's own block scale is a
  power of two (E8M0) per 32 entries; that is not what is computed here.

* **Outliers** (``keep_outliers=k``): the ``k`` largest-magnitude entries of each group are kept
  in full precision (in the input's dtype) and set to zero before the group's scale is taken, so
  they do not stretch it; dequantization writes them back. Source: Stable-SPAM's
  ``fake_topk_quantize`` (top-2 per group of activations, and in its FP4 quantizer of weights and
  activations).

Library use: torchao (optional, not a dependency) has the affine primitives
(``choose_qparams_affine``, ``quantize_affine``, ``dequantize_affine``) and MX FP4 conversions
(``torchao.prototype.mx_formats.kernels.f32_to_f4_unpacked`` / ``f4_unpacked_to_f32``); they run on
CPU and ``tests/test_quant.py`` checks that our codes, scales and values equal theirs. The
functions here are ours, not calls into torchao, because torchao has no stochastic rounding, no
outlier exclusion and no E1M2, its import takes seconds and warns on CPU builds, and a result that
depended on whether an optional package is installed would not be reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

__all__ = [
    "KINDS",
    "INT_BITS",
    "E1M2_GRID",
    "E2M1_GRID",
    "QuantFormat",
    "Outliers",
    "Quantized",
    "quantize",
    "dequantize",
    "fake_quantize",
    "uniform_noise",
    "bits_per_weight",
    "STABLE_SPAM_INT4_WEIGHTS",
    "STABLE_SPAM_INT4_ACTIVATIONS",
    "STABLE_SPAM_FP4",
]

KINDS = ("int", "fp4_e1m2", "fp4_e2m1")
INT_BITS = (2, 3, 4, 8)

E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
"""FP4 E2M1 magnitudes by code (OCP MX v1.0, section 5.3.3)."""

E1M2_GRID = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
"""FP4 E1M2 magnitudes by code (1 exponent bit, 2 mantissa bits, bias 1; derived above)."""

_GRIDS = {"fp4_e1m2": E1M2_GRID, "fp4_e2m1": E2M1_GRID}

# The smallest scale: torchao's default ``eps`` for float32 input (finfo.smallest_normal), so an
# all-zero group gets a finite scale and codes 0 instead of 0/0.
_EPS = torch.finfo(torch.float32).tiny


@dataclass(frozen=True)
class QuantFormat:
    """One quantization format.

    Attributes:
        kind: ``"int"``, ``"fp4_e1m2"`` or ``"fp4_e2m1"``.
        bits: 2, 3, 4 or 8 for ``"int"``; 4 for the FP4 kinds.
        group_size: entries per group along the last dimension; ``-1`` one group per row
            (per-channel / per-token), ``None`` one group for the whole tensor.
        symmetric: absmax scale and no zero point; ``False`` (integers only) is min–max with a
            zero point. The FP4 grids are sign–magnitude, hence always symmetric.
        stochastic: stochastic rounding (needs a generator or noise) instead of round-to-nearest.
        keep_outliers: how many largest-magnitude entries of each group stay in full precision.
        flat: groups of ``group_size`` consecutive entries of the flattened tensor (may span rows;
            Stable-SPAM's ``reshape(-1, g)``) instead of along the last dimension.
    """

    kind: str = "int"
    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = True
    stochastic: bool = False
    keep_outliers: int = 0
    flat: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown quantization kind {self.kind!r}; choose one of {', '.join(KINDS)}")
        allowed = INT_BITS if self.kind == "int" else (4,)
        if isinstance(self.bits, bool) or self.bits not in allowed:
            raise ValueError(f"{self.kind} takes bits in {allowed}, got {self.bits!r}")
        g = self.group_size
        if g is not None and (isinstance(g, bool) or not isinstance(g, int) or not (g == -1 or g > 0)):
            raise ValueError(f"group_size must be a positive int, -1 (one group per row) or None (per tensor), got {g!r}")
        if self.kind != "int" and not self.symmetric:
            raise ValueError(f"{self.kind} is a sign-magnitude grid: it has no zero point, so symmetric must be True")
        k = self.keep_outliers
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"keep_outliers must be a non-negative int, got {k!r}")
        if g is not None and g > 0 and k >= g:
            raise ValueError(f"keep_outliers={k} leaves nothing to quantize in a group of {g}")

    @property
    def qmin(self) -> int:
        """Smallest integer code (``int`` kind)."""
        return 0 if not self.symmetric else -(2 ** (self.bits - 1) - 1)

    @property
    def qmax(self) -> int:
        """Largest integer code (``int`` kind)."""
        return 2**self.bits - 1 if not self.symmetric else 2 ** (self.bits - 1) - 1

    @property
    def label(self) -> str:
        """A short name for tables, e.g. ``int4-g128-asym``, ``fp4_e1m2-g256-o2``, ``int4-g64-sr-o2``."""
        group = {None: "tensor", -1: "row"}.get(self.group_size, f"g{self.group_size}")
        parts = [f"int{self.bits}" if self.kind == "int" else self.kind, group]
        if self.kind == "int" and not self.symmetric:
            parts.append("asym")
        if self.stochastic:
            parts.append("sr")
        if self.keep_outliers:
            parts.append(f"o{self.keep_outliers}")
        if self.flat and self.group_size not in (None, -1):
            parts.append("flat")
        return "-".join(parts)

    def group_entries(self, shape: tuple[int, ...] | torch.Size) -> int:
        """Entries per group for a tensor of ``shape``; raises a one-line ``ValueError`` when the
        group size does not divide the last dimension."""
        shape = tuple(shape)
        if not shape:
            raise ValueError(f"cannot quantize a 0-dimensional tensor per group ({self.label})")
        last = shape[-1]
        if self.group_size is None:
            entries = math.prod(shape)
        elif self.flat and self.group_size > 0:
            if math.prod(shape) % self.group_size:
                raise ValueError(
                    f"group_size {self.group_size} does not divide the {math.prod(shape)} entries of shape {shape}; "
                    "use a divisor, -1 (per row) or None (per tensor)"
                )
            entries = self.group_size
        elif self.group_size == -1:
            entries = last
        else:
            if last % self.group_size:
                raise ValueError(
                    f"group_size {self.group_size} does not divide the last dimension of shape {shape} ({last}); "
                    f"use a divisor of {last}, -1 (per row) or None (per tensor)"
                )
            entries = self.group_size
        if self.keep_outliers >= entries:
            raise ValueError(f"keep_outliers={self.keep_outliers} leaves nothing to quantize in groups of {entries} (shape {shape})")
        return entries


STABLE_SPAM_INT4_WEIGHTS = QuantFormat("int", 4, 256, symmetric=False)
"""Stable-SPAM's INT4 weights: asymmetric min–max per group of 256, round-to-nearest."""

STABLE_SPAM_INT4_ACTIVATIONS = QuantFormat("int", 4, 64, symmetric=True, stochastic=True, keep_outliers=2)
"""Stable-SPAM's INT4 activations as DESIGN 2.12 states them: absmax per group of 64, stochastic
rounding, the 2 largest-magnitude entries kept. (The released ``QLinear`` overwrites the
activation group size with the weight group size, 256, and takes the stochastic flag from
``--stochastic_round``, so its ``--act_group_size``/``--act_stochastic`` flags are parsed but unused.)"""

STABLE_SPAM_FP4 = QuantFormat("fp4_e1m2", 4, 256, keep_outliers=2)
"""Stable-SPAM's FP4 format for weights and activations: E1M2 per group of 256, top-2 kept."""


class Outliers(NamedTuple):
    """The entries kept in full precision: per group, their positions and values."""

    indices: torch.Tensor  # (groups, k) int64 positions inside the group
    values: torch.Tensor  # (groups, k) in the input's dtype


class Quantized(NamedTuple):
    """What :func:`quantize` stores.

    ``codes`` has the input's shape: int8 (symmetric integers), uint8 (asymmetric integers, or FP4
    ``sign << 3 | grid index``). ``scale`` (float32) and ``zero`` (int32 codes, ``None`` when
    symmetric) have shape ``x.shape[:-1] + (groups per row,)``, or ``()`` per tensor. ``outliers``
    is ``None`` unless ``keep_outliers > 0``.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    outliers: Outliers | None


def uniform_noise(shape: tuple[int, ...] | torch.Size, generator: torch.Generator, device: torch.device | str | None = None) -> torch.Tensor:
    """``U[0, 1)`` float32 draws of ``shape`` from ``generator`` (on its device), moved to ``device``."""
    noise = torch.rand(tuple(shape), generator=generator, device=generator.device, dtype=torch.float32)
    return noise if device is None else noise.to(device)


def _grouped(x: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """``x`` as ``(groups, entries)`` rows, groups consecutive along the last dimension."""
    return x.reshape(-1, fmt.group_entries(x.shape))


def _scale_shape(shape: torch.Size, fmt: QuantFormat) -> tuple[int, ...]:
    if fmt.group_size is None:
        return ()
    if fmt.flat and fmt.group_size > 0:
        return (math.prod(shape) // fmt.group_entries(shape),)
    return (*shape[:-1], shape[-1] // fmt.group_entries(shape))


def _resolve_noise(x: torch.Tensor, fmt: QuantFormat, generator: torch.Generator | None, noise: torch.Tensor | None) -> torch.Tensor | None:
    if not fmt.stochastic:
        if generator is not None or noise is not None:
            raise ValueError(f"{fmt.label} rounds to nearest: it takes no generator or noise (set stochastic=True to use them)")
        return None
    if (generator is None) == (noise is None):
        raise ValueError(f"{fmt.label} rounds stochastically: pass exactly one of generator= (a seeded torch.Generator) and noise=")
    if noise is None:
        return uniform_noise(x.shape, generator, x.device)
    if noise.shape != x.shape:
        raise ValueError(f"noise must have the input's shape {tuple(x.shape)}, got {tuple(noise.shape)}")
    return noise.to(device=x.device, dtype=torch.float32)


def _quantize_int(groups: torch.Tensor, fmt: QuantFormat, noise: torch.Tensor | None):
    if fmt.symmetric:
        scale = (groups.abs().amax(dim=-1, keepdim=True) / fmt.qmax).clamp(min=_EPS)
        zero = None
    else:
        lo = groups.amin(dim=-1, keepdim=True).clamp(max=0)
        hi = groups.amax(dim=-1, keepdim=True).clamp(min=0)
        scale = ((hi - lo) / fmt.qmax).clamp(min=_EPS)
        zero = (fmt.qmin - torch.round(lo / scale)).clamp(fmt.qmin, fmt.qmax)
    y = groups / scale
    y = torch.round(y) if noise is None else torch.floor(y + noise)
    if zero is not None:
        y = y + zero
    codes = y.clamp(fmt.qmin, fmt.qmax).to(torch.int8 if fmt.symmetric else torch.uint8)
    return codes, scale, zero


def _quantize_fp4(groups: torch.Tensor, fmt: QuantFormat, noise: torch.Tensor | None):
    grid = groups.new_tensor(_GRIDS[fmt.kind])
    top = len(grid) - 1
    scale = (groups.abs().amax(dim=-1, keepdim=True) / grid[top]).clamp(min=_EPS)
    a = (groups.abs() / scale).clamp(max=grid[top])
    if noise is None:
        # Nearest grid point; on a midpoint the two searches differ by one: take the even code.
        mids = (grid[1:] + grid[:-1]) / 2
        below, above = torch.bucketize(a, mids), torch.bucketize(a, mids, right=True)
        index = torch.where(below % 2 == 0, below, above)
    else:
        below = (torch.bucketize(a, grid, right=True) - 1).clamp(0, top - 1)
        low, high = grid[below], grid[below + 1]
        index = below + (noise < (a - low) / (high - low)).long()
    codes = (index | (groups < 0).long() << 3).to(torch.uint8)
    return codes, scale, None


def quantize(
    x: torch.Tensor,
    fmt: QuantFormat,
    *,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> Quantized:
    """Quantize ``x`` to ``fmt`` (see the module docstring for the formulas).

    Args:
        x: a float tensor; groups run along its last dimension.
        fmt: the format.
        generator: for stochastic rounding, the seeded generator to draw the uniforms from.
        noise: for stochastic rounding, the ``U[0, 1)`` draws themselves (``x``'s shape), instead
            of a generator (so that a compiled graph sees a tensor, not a generator).

    Raises:
        ValueError: the group size does not divide the last dimension; a stochastic format without
            a generator or noise, or a round-to-nearest one with them.
    """
    if not x.is_floating_point():
        raise ValueError(f"quantize() takes a floating-point tensor, got {x.dtype}")
    noise = _resolve_noise(x, fmt, generator, noise)
    groups = _grouped(x, fmt).float()
    outliers = None
    if fmt.keep_outliers:
        indices = groups.abs().topk(fmt.keep_outliers, dim=-1).indices
        outliers = Outliers(indices, _grouped(x, fmt).gather(-1, indices))
        groups = groups.scatter(-1, indices, 0.0)
    if noise is not None:
        noise = noise.reshape(groups.shape)
    encode = _quantize_int if fmt.kind == "int" else _quantize_fp4
    codes, scale, zero = encode(groups, fmt, noise)
    shape = _scale_shape(x.shape, fmt)
    return Quantized(
        codes.reshape(x.shape),
        scale.reshape(shape),
        None if zero is None else zero.to(torch.int32).reshape(shape),
        outliers,
    )


def dequantize(quantized: Quantized, fmt: QuantFormat, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The values ``x̂`` that :func:`quantize`'s output stands for, in ``dtype``, outliers restored."""
    codes, scale, zero, outliers = quantized
    groups = _grouped(codes, fmt)
    scale = scale.reshape(groups.shape[0], 1)
    if fmt.kind == "int":
        values = groups.float()
        if zero is not None:
            values = values - zero.reshape(groups.shape[0], 1).float()
    else:
        grid = scale.new_tensor(_GRIDS[fmt.kind])
        codes_long = groups.long()
        magnitude = grid[codes_long & 7]
        values = torch.where(codes_long >> 3 == 1, -magnitude, magnitude)
    values = (values * scale).to(dtype)
    if outliers is not None:
        values = values.scatter(-1, outliers.indices, outliers.values.to(dtype))
    return values.reshape(codes.shape)


def fake_quantize(
    x: torch.Tensor,
    fmt: QuantFormat,
    *,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """``dequantize(quantize(x))`` with ``x``'s shape and dtype (no gradient; see
    :func:`lowrank.quant.fake.straight_through` for training)."""
    return dequantize(quantize(x, fmt, generator=generator, noise=noise), fmt, x.dtype)


def bits_per_weight(
    fmt: QuantFormat,
    shape: tuple[int, ...] | None = None,
    *,
    scale_bits: int = 16,
    outlier_bits: int = 16,
) -> float:
    """Storage per entry in bits, codes plus each group's overhead, for reporting::

        bits + (scale_bits + zero_bits + k · (outlier_bits + ceil(log2 G))) / G

    with ``G`` the entries per group (``group_size``; a row of ``shape`` for ``-1``; all of
    ``shape`` for ``None``), ``zero_bits = bits`` for the asymmetric integer format (the zero
    point is a code) and 0 otherwise, ``k = keep_outliers`` (each outlier stores its value and its
    position in the group). Defaults assume fp16 scales and outliers: INT4 per group of 128
    symmetric is 4.125 bits, asymmetric 4.156; MX-style E2M1 with an 8-bit scale per 32 is 4.25.
    """
    if fmt.group_size is not None and fmt.group_size > 0:
        entries = fmt.group_size
        if shape is not None:
            fmt.group_entries(shape)
    elif shape is None:
        raise ValueError(f"{fmt.label}: pass the tensor's shape, its groups are {'rows' if fmt.group_size == -1 else 'the whole tensor'}")
    else:
        entries = fmt.group_entries(shape)
    zero_bits = fmt.bits if fmt.kind == "int" and not fmt.symmetric else 0
    outlier = fmt.keep_outliers * (outlier_bits + math.ceil(math.log2(entries))) if fmt.keep_outliers else 0
    return fmt.bits + (scale_bits + zero_bits + outlier) / entries
