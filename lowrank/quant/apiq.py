"""A low-rank layer over a frozen *quantized* base, and ApiQ's activation-preserving initialisation
of its factors, in closed form.

**The layer** (:class:`QuantizedLowRankLinear`, a :class:`~lowrank.layers.LowRankLinear` subclass;
``lowrank/layers.py`` is not changed)::

    y = Q(W) x + s · B(A x) + b

``Q(W)`` is stored as integer codes plus per-group scales (and zero points) in a
:class:`QuantizedBase` — ``codes`` (int8 symmetric / uint8 asymmetric, one byte per code, not
bit-packed), ``scale`` (float32), ``zero`` (int32 or absent) — and dequantized on the fly in every
forward (:func:`lowrank.quant.dequantize`); the state dict holds those tensors only. ``A``, ``B``
train; ``Q(W)`` and ``b`` are frozen. ``dense_weight()`` / ``to_dense()`` (and so
:func:`lowrank.merge_to_dense`) give the dequantized base plus the merged factors.

**ApiQ initialisation** (Liao et al. 2024, "ApiQ: Finetuning of 2-Bit Quantized Large Language
Model", arXiv 2402.05147, EMNLP 2024): choose the factors so that the quantized layer, fed the
*quantized* model's own input ``X_q``, reproduces the *full-precision* layer's output on the full
precision model's input ``X`` (calibration tokens as rows, ``y = x Wᵀ``)::

    min over rank-r L = s·BA of   ‖X Wᵀ − X_q (Q + L)ᵀ‖²_F + δ‖L‖²_F

Because the inputs of layer ``ℓ`` come from the already-quantized layers ``< ℓ``, the factors of
layer ``ℓ`` also correct the error those layers left ("so errors do not accumulate"). ApiQ solves
this by gradient descent jointly with learnable clipping of ``Q``; we keep ``Q`` round-to-nearest
(fixed) and solve for ``L`` **in closed form**, which is a ridge reduced-rank regression. With
``H = X_qᵀX_q + δI``, ``C = X_qᵀX``::

    L* = (W Cᵀ − Q X_qᵀX_q) H⁻¹                       the unconstrained ridge solution
    objective(L) = const + ‖(L − L*) H^½‖²_F           (the residual is orthogonal to X_q)
    T = L* H^½ = (W Cᵀ − Q X_qᵀX_q) H^-½ = U Σ Vᵀ     SVD
    L = U_r Σ_r V_rᵀ H^-½                              (Eckart–Young in the H-weighted norm)

When ``X_q = X`` (the first layer, or feeding both models the same input) this is the best rank-r
correction of ``W − Q`` in the ``H``-weighted norm, from the SVD of ``(W − Q) H^½`` (up to the
``δ`` shrinkage). ``δ = damp · mean(diag(X_qᵀX_q))`` (``damp = 0.01``, GPTQ's relative damping),
so ``H`` is invertible however few the tokens. ``H^{±½}`` come from one ``eigh``; everything runs
in float64. The factors are split ``B = U_r Σ_r^½ / √s``, ``A = Σ_r^½ V_rᵀ H^-½ / √s`` and then
balanced (:func:`lowrank.linalg.balanced_factors`). :func:`output_error` evaluates the objective's
first term from the same statistics, relative to ``‖X Wᵀ‖²``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import LowRankLinear
from ..linalg import balanced_factors
from .clipping import CLIPPINGS, LearnedClipBase
from .formats import Quantized, QuantFormat, dequantize, quantize

__all__ = ["QuantizedBase", "QuantizedLowRankLinear", "LayerStatistics", "apiq_factors", "output_error"]


class QuantizedBase(nn.Module):
    """``Q(W)`` as integer codes and per-group scales (and zero points) in ``fmt``.

    Buffers (the whole state dict): ``codes`` (``m × n``), ``scale`` and ``zero`` (``m × groups``;
    ``zero`` is ``None`` for a symmetric format). :meth:`weight` dequantizes."""

    def __init__(self, fmt: QuantFormat, quantized: Quantized) -> None:
        super().__init__()
        if quantized.outliers is not None:
            raise ValueError("QuantizedBase stores no full-precision outliers; use a format with keep_outliers=0")
        self.fmt = fmt
        self.register_buffer("codes", quantized.codes)
        self.register_buffer("scale", quantized.scale)
        self.register_buffer("zero", quantized.zero)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, fmt: QuantFormat) -> "QuantizedBase":
        """Round-to-nearest quantization of ``weight`` (groups along the input dimension)."""
        return cls(fmt, quantize(weight.detach(), fmt))

    def weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dequantized ``m × n`` matrix ``Q(W)`` in ``dtype``."""
        return dequantize(Quantized(self.codes, self.scale, self.zero, None), self.fmt, dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.codes.shape)}, format={self.fmt.label}"


class QuantizedLowRankLinear(LowRankLinear):
    """``y = Q(W) x + s·B(A x) + b``: low-rank factors over a frozen quantized base (module docstring).

    Build it with :meth:`from_linear`. ``merge()`` is refused (``Q(W)`` cannot absorb ``s·BA``
    without requantizing); ``refactorize()`` and the dense views work as on ``LowRankLinear``."""

    quantized_base: QuantizedBase | LearnedClipBase

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, fmt: QuantFormat, *, alpha: float | None = None,
                    seed: int = 0, clipping: str = "frozen") -> "QuantizedLowRankLinear":
        """Quantize ``linear.weight`` into the base; ``A`` Kaiming, ``B = 0`` (the layer starts
        equal to ``Q(W) x + b``, PEFT's LoRA initialisation); the bias is copied and frozen.

        ``clipping="frozen"``: round-to-nearest codes (:class:`QuantizedBase`). ``"learned"``: a
        :class:`~lowrank.quant.clipping.LearnedClipBase` (ApiQ's learnable clipping), trainable
        until :meth:`freeze_base` stores its codes."""
        weight = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, rank, alpha=alpha, bias=linear.bias is not None,
                    init="lora", seed=seed, device=weight.device, dtype=weight.dtype)
        if clipping not in CLIPPINGS:
            raise ValueError(f"clipping must be one of {', '.join(CLIPPINGS)}, got {clipping!r}")
        layer.quantized_base = QuantizedBase.from_weight(weight, fmt) if clipping == "frozen" else LearnedClipBase(weight, fmt)
        if linear.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(linear.bias)
            layer.bias.requires_grad_(False)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + F.linear(x, self.quantized_base.weight(x.dtype))

    def freeze_base(self) -> None:
        """Store a learned clipping's codes (a :class:`QuantizedBase`); nothing to do when frozen."""
        if isinstance(self.quantized_base, LearnedClipBase):
            self.quantized_base = self.quantized_base.freeze()

    def delta_weight(self) -> torch.Tensor:
        """``s·BA`` (``m × n``, with gradient: for regularizers on the effective weight)."""
        return (self.B @ self.A) * self.scale

    @torch.no_grad()
    def dense_weight(self) -> torch.Tensor:
        """``Q(W) + s·BA``: the dequantized base plus the merged factors."""
        return (super().dense_weight().float() + self.quantized_base.weight(torch.float32)).to(self.A.dtype)

    def merge(self) -> float:
        raise ValueError("QuantizedLowRankLinear cannot merge: its base is quantized; use to_dense() or lowrank.merge_to_dense")

    @torch.no_grad()
    def to_lowrank_linear(self) -> LowRankLinear:
        """An ordinary ``LowRankLinear`` with ``keep_base``: base ``Q(W)`` dequantized, the same
        ``A``, ``B``, bias and scale (the same function) — a LoRA layer over a dense base, which
        :func:`lowrank.integrations.peft.save_peft_adapter` can write."""
        base = self.quantized_base.weight(self.A.dtype)
        layer = LowRankLinear(self.in_features, self.out_features, self.rank, alpha=self.alpha, bias=self.bias is not None,
                              keep_base=True, weight=base, seed=self.seed, device=base.device, dtype=self.A.dtype)
        layer.A.copy_(self.A)
        layer.B.copy_(self.B)
        if self.bias is not None:
            layer.bias.copy_(self.bias)
        return layer

    def extra_repr(self) -> str:
        return super().extra_repr() + f", base={self.quantized_base.fmt.label}"


class LayerStatistics:
    """Running second moments of one layer's calibration inputs, in float64: ``X_qᵀX_q``
    (``gram_q``), ``X_qᵀX`` (``cross``), ``XᵀX`` (``gram``) and the token count."""

    def __init__(self, in_features: int, device: torch.device | str | None = None) -> None:
        shape, options = (in_features, in_features), {"dtype": torch.float64, "device": device}
        self.gram_q = torch.zeros(shape, **options)
        self.cross = torch.zeros(shape, **options)
        self.gram = torch.zeros(shape, **options)
        self.tokens = 0

    @torch.no_grad()
    def add(self, inputs_q: torch.Tensor, inputs: torch.Tensor) -> None:
        """Add a batch: the quantized model's input ``X_q`` and the full-precision model's ``X``
        to the same layer, same tokens (any leading shape, last dimension ``n``)."""
        x_q = inputs_q.reshape(-1, inputs_q.shape[-1]).to(self.gram_q)
        x = inputs.reshape(-1, inputs.shape[-1]).to(self.gram_q)
        self.gram_q += x_q.T @ x_q
        self.cross += x_q.T @ x
        self.gram += x.T @ x
        self.tokens += x.shape[0]

    def input_norms(self) -> torch.Tensor:
        """``‖X_{:,j}‖₂`` per input channel (full-precision inputs)."""
        return self.gram.diagonal().clamp_min(0).sqrt()


@torch.no_grad()
def apiq_factors(weight: torch.Tensor, base: torch.Tensor, stats: LayerStatistics, *, rank: int, scale: float = 1.0,
                 damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """The closed-form ApiQ factors ``(B, A)`` (``m × r``, ``r × n``, float64) with
    ``scale · B A = L`` minimising ``‖X Wᵀ − X_q (base + L)ᵀ‖² + δ‖L‖²`` (module docstring).

    Args:
        weight: the full-precision ``W`` (``m × n``).
        base: the dequantized ``Q(W)``.
        stats: the layer's calibration statistics.
        rank: ``r``.
        scale: the layer's ``s = alpha / r``.
        damp: ``δ`` relative to the mean diagonal of ``X_qᵀX_q``.
    """
    if stats.tokens == 0:
        raise ValueError("apiq_factors: no calibration tokens reached this layer")
    W, Q = weight.to(stats.gram_q), base.to(stats.gram_q)
    eye = torch.eye(W.shape[1], dtype=W.dtype, device=W.device)
    delta = damp * float(stats.gram_q.diagonal().mean()) + torch.finfo(W.dtype).tiny
    eigenvalues, vectors = torch.linalg.eigh(stats.gram_q + delta * eye)
    inv_root = (vectors * eigenvalues.clamp_min(delta).rsqrt()) @ vectors.T
    target = (W @ stats.cross.T - Q @ stats.gram_q) @ inv_root
    u, sigma, v_t = torch.linalg.svd(target, full_matrices=False)
    root = sigma[:rank].sqrt() / scale**0.5
    B = u[:, :rank] * root
    A = (root[:, None] * v_t[:rank]) @ inv_root
    B, A, _ = balanced_factors(B, A)
    return B, A


@torch.no_grad()
def output_error(weight: torch.Tensor, effective: torch.Tensor, stats: LayerStatistics) -> float:
    """``‖X Wᵀ − X_q Mᵀ‖² / ‖X Wᵀ‖²`` for the effective weight ``M`` (e.g. ``Q`` for RTN,
    ``Q + s·BA`` after ApiQ), from the statistics alone::

        ‖X Wᵀ − X_q Mᵀ‖² = tr(W XᵀX Wᵀ) − 2 Σ (W Cᵀ) ⊙ M + Σ (M X_qᵀX_q) ⊙ M
    """
    W, M = weight.to(stats.gram), effective.to(stats.gram)
    reference = float((W @ stats.gram * W).sum())
    error = reference - 2 * float((W @ stats.cross.T * M).sum()) + float((M @ stats.gram_q * M).sum())
    return max(error, 0.0) / max(reference, torch.finfo(torch.float64).tiny)
