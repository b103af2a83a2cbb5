"""Learnable weight clipping (LWC) for integer weight quantization, as ApiQ trains it.

ApiQ (Liao et al. 2024, arXiv 2402.05147, section 3; released code ``apiq/quant_linear.py``,
``UniformAffineQuantizer(lwc=True)``) takes OmniQuant's learnable weight clipping (Shao et al.
2024, arXiv 2308.13137, section 3.2): each quantization group ``x`` gets two learnable logits
``γ_hi``, ``γ_lo`` that shrink its range through a sigmoid before the scale is taken::

    hi = σ(γ_hi) · max(max x, 0)        lo = σ(γ_lo) · min(min x, 0)
    s  = max((hi − lo) / (2^b − 1), s_min)      z = clamp(−round(lo / s), 0, 2^b − 1)
    q  = clamp(⌊x / s⌉ + z, 0, 2^b − 1)         x̂ = s · (q − z)

(asymmetric; the symmetric grid takes ``s = max(hi, −lo) / (2^(b−1) − 1)`` and no zero point, as
:mod:`lowrank.quant.formats`). ``⌊·⌉`` is rounding with a straight-through gradient (identity),
the zero point is rounded without one, and ``clamp`` passes no gradient outside the grid, as in
the released code; so ``∂x̂/∂γ`` flows through ``s`` (and through the clipped entries). The
range is widened to include 0 as :mod:`lowrank.quant.formats` does (the released code uses the
plain min and max; the two agree on every group that holds both signs), so with ``σ(γ) = 1`` the
codes are exactly :func:`lowrank.quant.formats.quantize`'s round-to-nearest ones, and the learned
result is stored in the same :class:`~lowrank.quant.formats.Quantized` layout (codes, scale,
zero). The logits start at :data:`CLIP_INIT` = 4 (``σ(4) ≈ 0.982``), the released
``init_value``; ``s_min`` is the released ``CLIPMIN`` (1e-5).

:func:`clipped_quantize` is the pure function; :class:`LearnedClipBase` holds the frozen
full-precision ``W`` and the logits while a block is retrained and :meth:`LearnedClipBase.freeze`
turns it into the integer codes of a :class:`~lowrank.quant.apiq.QuantizedBase`.
"""

from __future__ import annotations

import torch
from torch import nn

from .formats import Quantized, QuantFormat, _grouped, _scale_shape

__all__ = ["CLIPPINGS", "CLIP_INIT", "SCALE_MIN", "round_ste", "clipped_quantize", "LearnedClipBase"]

CLIPPINGS = ("learned", "frozen")
"""The base of a quantized layer while its block is retrained: ``learned`` clipping (this
module, ApiQ's) or ``frozen`` round-to-nearest codes."""
CLIP_INIT = 4.0
"""Initial clipping logit (``σ(4) ≈ 0.982`` of the group's range): ApiQ's / OmniQuant's ``init_value``."""
SCALE_MIN = 1e-5
"""Smallest scale: ApiQ's / OmniQuant's ``CLIPMIN``."""


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward, identity backward (the straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def clipped_quantize(weight: torch.Tensor, fmt: QuantFormat, up: torch.Tensor, low: torch.Tensor) -> tuple[torch.Tensor, Quantized]:
    """Quantize ``weight`` with learned clipping (module docstring).

    Args:
        weight: the full-precision matrix (groups along the last dimension, or flat, as ``fmt``).
        fmt: an integer round-to-nearest format without outliers.
        up, low: the logits ``γ_hi``, ``γ_lo``, one per group (the shape of ``Quantized.scale``).

    Returns:
        ``(x̂, quantized)``: the dequantized values in float32 with a gradient to ``up`` and
        ``low``, and the codes, scale and zero point (no gradient) that :func:`dequantize` turns
        into the same values.
    """
    if fmt.kind != "int" or fmt.stochastic or fmt.keep_outliers:
        raise ValueError(f"learned clipping takes a round-to-nearest integer format without outliers, got {fmt.label}")
    groups = _grouped(weight, fmt).float()
    up, low = torch.sigmoid(up.float()).reshape(-1, 1), torch.sigmoid(low.float()).reshape(-1, 1)
    hi = groups.amax(dim=-1, keepdim=True).clamp(min=0) * up
    lo = groups.amin(dim=-1, keepdim=True).clamp(max=0) * low
    if fmt.symmetric:
        scale = (torch.maximum(hi, -lo) / fmt.qmax).clamp(min=SCALE_MIN)
        zero = None
        codes = round_ste(groups / scale).clamp(fmt.qmin, fmt.qmax)
        values = codes * scale
    else:
        scale = ((hi - lo) / fmt.qmax).clamp(min=SCALE_MIN)
        zero = (fmt.qmin - torch.round(lo.detach() / scale.detach())).clamp(fmt.qmin, fmt.qmax)
        codes = (round_ste(groups / scale) + zero).clamp(fmt.qmin, fmt.qmax)
        values = (codes - zero) * scale
    shape = _scale_shape(weight.shape, fmt)
    quantized = Quantized(
        codes.detach().to(torch.int8 if fmt.symmetric else torch.uint8).reshape(weight.shape),
        scale.detach().reshape(shape),
        None if zero is None else zero.to(torch.int32).reshape(shape),
        None,
    )
    return values.reshape(weight.shape), quantized


class LearnedClipBase(nn.Module):
    """``Q(W)`` with learnable per-group clipping, while a block is retrained.

    Buffer ``full`` (the frozen ``W``), parameters ``up`` and ``low`` (the logits, one per group,
    starting at :data:`CLIP_INIT`). :meth:`weight` is the differentiable ``x̂`` of
    :func:`clipped_quantize`; :meth:`freeze` the integer codes with the learned clipping, as a
    :class:`~lowrank.quant.apiq.QuantizedBase` (the full-precision copy is then dropped)."""

    def __init__(self, weight: torch.Tensor, fmt: QuantFormat, init: float = CLIP_INIT) -> None:
        super().__init__()
        self.fmt = fmt
        self.register_buffer("full", weight.detach().clone())
        shape = _scale_shape(weight.shape, fmt)
        self.up = nn.Parameter(torch.full(shape, float(init), device=weight.device))
        self.low = nn.Parameter(torch.full(shape, float(init), device=weight.device))

    def weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The clipped, quantized ``m × n`` matrix in ``dtype`` (with a gradient to the logits)."""
        return clipped_quantize(self.full, self.fmt, self.up, self.low)[0].to(dtype)

    @torch.no_grad()
    def freeze(self) -> nn.Module:
        """The :class:`~lowrank.quant.apiq.QuantizedBase` of the current clipping."""
        from .apiq import QuantizedBase

        return QuantizedBase(self.fmt, clipped_quantize(self.full, self.fmt, self.up, self.low)[1])

    def extra_repr(self) -> str:
        return f"{tuple(self.full.shape)}, format={self.fmt.label}, learned clipping"
