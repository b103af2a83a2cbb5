"""``LowRankLinear``: a linear layer trained as low-rank factors, optionally plus a frozen dense
base (ReLoRA) and a fixed-support sparse part (SLTrain).

The layer computes::

    y = W0 x + s · B (A x) + S x + b        A: r × n,  B: m × r,  s = alpha / r

where ``W0`` (frozen, optional) and ``S`` (sparse, optional) are off unless asked for. ``B @ A``
is never formed in forward or backward, so the cost per token is ``O((m + n) r)``.

Sources: low-rank pretraining and weight refactorization, Glentis et al. 2025 (arXiv
2505.22922); ReLoRA, Lialin et al. 2023 (arXiv 2307.05695), section 3; SLTrain, Han et al. 2024
(arXiv 2406.02214), section 3.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from .linalg import balanced_factors, kaiming_uniform_, spectral_factors, work_dtype
from .precision import linear
from .seeding import (
    STREAM_INIT,
    STREAM_MERGE,
    STREAM_SPARSE_SUPPORT,
    STREAM_SPARSE_VALUES,
    cpu_generator,
    index_dtype,
    sample_subset,
    subset_size,
)

__all__ = ["LowRankLinear", "INITS", "SPARSE_INITS"]

INITS = ("kaiming", "lora", "spectral")
"""Factor initialisations: ``kaiming`` draws both factors like ``nn.Linear`` (the benchmark
paper's low-rank default); ``lora`` draws A and sets ``B = 0`` (ReLoRA: the layer starts equal to
its base); ``spectral`` starts from the top-r SVD of the dense weight being replaced, split
``U√Σ``, ``√ΣVᵀ`` (with a base, the base keeps the remainder, so the function is unchanged)."""

SPARSE_INITS = ("uniform", "zeros")
"""Initial values of SLTrain's sparse part: ``uniform`` draws ``S ~ U(−1/√n, 1/√n)`` on its
support, as SLTrain's released code does (``splora_linear.py``, with ``A`` Kaiming and ``B = 0``,
which is the ``lora`` factor init); ``zeros`` starts ``S = 0`` (so a layer with a frozen base, or a
spectral start, keeps the function it replaces)."""

class SparseLinearFunction(torch.autograd.Function):
    """``x @ Sᵀ`` for a sparse ``S`` given by ``values`` at flat ``indices`` of an ``m × n`` matrix.

    The dense ``S`` is rebuilt in backward instead of being saved, so a sparse layer holds no
    ``m × n`` tensor between forward and backward (SLTrain's memory argument, section 3.3).
    """

    @staticmethod
    def forward(ctx, x, values, indices, out_features: int, in_features: int):
        dense = _scatter_dense(values.to(x.dtype), indices, out_features, in_features)
        ctx.save_for_backward(x, values, indices)
        ctx.shape = (out_features, in_features)
        return F.linear(x, dense)

    @staticmethod
    def backward(ctx, grad_out):
        x, values, indices = ctx.saved_tensors
        out_features, in_features = ctx.shape
        grad_x = grad_values = None
        if ctx.needs_input_grad[0]:
            dense = _scatter_dense(values.to(grad_out.dtype), indices, out_features, in_features)
            grad_x = (grad_out @ dense).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_dense = grad_out.reshape(-1, out_features).T @ x.reshape(-1, in_features).to(grad_out.dtype)
            grad_values = grad_dense.reshape(-1)[indices].to(values.dtype)
        return grad_x, grad_values, None, None, None


def _scatter_dense(values: torch.Tensor, indices: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    dense = values.new_zeros(rows * cols)
    dense[indices] = values
    return dense.view(rows, cols)


class LowRankLinear(nn.Module):
    """``y = W0 x + s · B(A x) + S x + b``: a linear layer trained through rank-r factors.

    Args:
        in_features: ``n``.
        out_features: ``m``.
        rank: ``r``, with ``0 < r ≤ min(m, n)``.
        alpha: scale numerator; ``s = alpha / r``. ``None`` means ``alpha = r`` (``s = 1``).
        bias: whether the layer has a trainable bias.
        keep_base: keep a frozen dense ``W0`` (ReLoRA mode). It gets no gradient and no optimizer
            state; :meth:`merge` folds the factors into it.
        sparse_density: fraction of entries of a trainable sparse ``S`` (SLTrain mode; 0 = off).
            Its support is fixed and drawn from ``seed``.
        init: one of :data:`INITS`; ``None`` picks ``lora`` with a base and ``kaiming`` without.
        sparse_init: one of :data:`SPARSE_INITS`; ``None`` picks ``zeros`` with a base or the
            ``spectral`` init (the function is kept) and ``uniform`` (SLTrain's) otherwise.
        seed: seeds every random choice of this layer (initialisation, sparse support, the
            re-initialisation after each merge), so all DDP ranks agree without communicating.
        weight: optional dense ``m × n`` weight the layer replaces: it becomes ``W0`` with
            ``keep_base`` and is the matrix the ``spectral`` init factorizes.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        *,
        alpha: float | None = None,
        bias: bool = True,
        keep_base: bool = False,
        sparse_density: float = 0.0,
        init: str | None = None,
        sparse_init: str | None = None,
        seed: int = 0,
        weight: torch.Tensor | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, size in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(size, bool) or not isinstance(size, int) or size <= 0:  # before the rank, which is bounded by them
                raise ValueError(f"LowRankLinear({name}=...) must be a positive whole number, got {size!r}")
        check_rank(rank, out_features, in_features)
        check_sparse_density(sparse_density)
        init = init or ("lora" if keep_base else "kaiming")
        check_init(init)
        check_sparse_init(sparse_init)
        sparse_init = sparse_init or ("zeros" if keep_base or init == "spectral" else "uniform")
        if weight is not None and tuple(weight.shape) != (out_features, in_features):
            raise ValueError(f"weight must be {out_features}×{in_features}, got {tuple(weight.shape)}")

        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.alpha = float(rank if alpha is None else alpha)
        self.scale = self.alpha / rank
        self.seed = int(seed)
        # How the replaced module stored its weight, so to_dense() gives back the same kind.
        self.source_type = "linear"

        self.A = nn.Parameter(torch.empty(rank, in_features, **factory))
        self.B = nn.Parameter(torch.empty(out_features, rank, **factory))
        self.bias = nn.Parameter(torch.zeros(out_features, **factory)) if bias else None
        self.base_weight = None
        if keep_base:
            base = torch.zeros(out_features, in_features, **factory) if weight is None else weight.detach().clone().to(**factory)
            self.base_weight = nn.Parameter(base, requires_grad=False)
        self.sparse_values = None
        self.register_buffer("sparse_indices", None)
        if sparse_density > 0:
            numel = out_features * in_features
            k = subset_size(numel, sparse_density)
            if torch.device(device or "cpu").type == "meta":
                # Shape and dtype only: the memory estimator builds 7B models on meta, and
                # sampling a real support there would cost minutes for nothing.
                indices = torch.empty(k, dtype=index_dtype(numel), device="meta")
            else:
                indices = sample_subset(numel, k, seed=(seed, STREAM_SPARSE_SUPPORT))
            self.register_buffer("sparse_indices", indices.to(device))
            self.sparse_values = nn.Parameter(torch.zeros(indices.numel(), **factory))
        # Counts merges: seeds the re-initialisation of A after each one, and travels in the
        # state dict, so a resumed run re-initialises exactly as an uninterrupted one.
        self.register_buffer("num_merges", torch.zeros((), dtype=torch.int64, device=device))
        self._initialize(init, weight)
        self._initialize_sparse(sparse_init)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_module(cls, module: nn.Module, rank: int, **kwargs) -> "LowRankLinear":
        """Build from an ``nn.Linear`` or a GPT-2 style ``Conv1D`` (weight stored ``n × m``),
        keeping its bias, dtype and device; its weight becomes the base (``keep_base``) and
        feeds the ``spectral`` init."""
        if isinstance(module, Conv1D):
            weight, source_type = module.weight.detach().T, "conv1d"
        elif isinstance(module, nn.Linear):
            weight, source_type = module.weight.detach(), "linear"
        else:
            raise ValueError(
                f"cannot make a low-rank layer from {type(module).__name__}: only nn.Linear and "
                "transformers' Conv1D are supported; leave this module out of target_modules"
            )
        out_features, in_features = weight.shape
        layer = cls(
            in_features,
            out_features,
            rank,
            bias=module.bias is not None,
            weight=weight,
            device=weight.device,
            dtype=weight.dtype,
            **kwargs,
        )
        if module.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(module.bias)
        layer.source_type = source_type
        return layer

    @torch.no_grad()
    def _initialize(self, init: str, weight: torch.Tensor | None) -> None:
        if self.A.device.type == "meta":
            return  # no values to draw: a meta layer only describes shapes and dtypes
        generator = cpu_generator(self.seed, STREAM_INIT)
        if init == "spectral":
            if weight is None:
                # No dense layer given: factorize a fresh nn.Linear-style draw.
                weight = kaiming_uniform_(torch.empty(self.out_features, self.in_features), generator)
            B, A = spectral_factors(weight.to(work_dtype(self.A.dtype)) / self.scale, self.rank)
            self.B.copy_(B)
            self.A.copy_(A)
            if self.base_weight is not None:
                # PiSSA-style: the base keeps what the factors do not, so W0 + s·BA = W.
                self.base_weight.sub_((self.scale * (B @ A)).to(self.base_weight.dtype))
            return
        kaiming_uniform_(self.A, generator)
        if init == "kaiming":
            kaiming_uniform_(self.B, generator)
        else:  # lora
            self.B.zero_()

    @torch.no_grad()
    def _initialize_sparse(self, sparse_init: str) -> None:
        if self.sparse_values is None or self.sparse_values.device.type == "meta" or sparse_init == "zeros":
            return
        bound = 1.0 / math.sqrt(self.in_features)
        values = torch.empty(self.sparse_values.shape, dtype=torch.float32)
        values.uniform_(-bound, bound, generator=cpu_generator(self.seed, STREAM_SPARSE_VALUES))
        self.sparse_values.copy_(values)

    # ------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Scaling the r-dimensional intermediate is cheaper than scaling the m-dimensional output.
        # precision.linear: F.linear, computing in x's dtype when the factors are stored in bf16.
        hidden = linear(x, self.A)
        if self.scale != 1.0:
            hidden = hidden * self.scale
        out = linear(hidden, self.B)
        if self.base_weight is not None:
            out = out + linear(x, self.base_weight)
        if self.sparse_values is not None:
            out = out + SparseLinearFunction.apply(x, self.sparse_values, self.sparse_indices, self.out_features, self.in_features)
        if self.bias is not None:
            out = out + self.bias
        return out

    # ------------------------------------------------------------------ events

    @torch.no_grad()
    def refactorize(self) -> torch.Tensor:
        """Balanced refactorization: ``B ← UΣ^½``, ``A ← Σ^½Vᵀ`` for ``B A = UΣVᵀ``.

        The product (and the layer's function) is unchanged up to float rounding; the factors
        become equally conditioned. Computed from thin QRs of the factors and an r×r SVD
        (:func:`lowrank.linalg.balanced_factors`), never the m×n product. The optimizer's moments
        for ``A`` and ``B`` refer to the old coordinates afterwards: reset them.

        Returns:
            The singular values of ``B A`` (float32, descending).
        """
        B, A, sigma = balanced_factors(self.B, self.A)
        self.B.copy_(B)
        self.A.copy_(A)
        return sigma

    @torch.no_grad()
    def merge(self) -> float:
        """ReLoRA's high-rank update merging: ``W0 ← W0 + s·BA``, then ``A`` Kaiming, ``B = 0``.

        The function is unchanged (the factors' contribution moves into the base and the new
        factors contribute zero); the sum of successive rank-r updates builds a high-rank
        change. The new ``A`` is drawn from ``(seed, merge count)``, identical on every rank.

        Returns:
            The Frobenius norm of the merged update ``s·BA``.
        """
        if self.base_weight is None:
            raise ValueError(
                "merge() needs a frozen base to merge into: build the layer with keep_base=True "
                "(LowRankConfig(keep_base=True)); for a layer without a base use refactorize()"
            )
        work = work_dtype(self.A.dtype)
        update = self.scale * (self.B.to(work) @ self.A.to(work))
        self.base_weight.add_(update.to(self.base_weight.dtype))
        self.num_merges += 1
        kaiming_uniform_(self.A, cpu_generator(self.seed, STREAM_MERGE, int(self.num_merges)))
        self.B.zero_()
        return float(update.norm())

    # ------------------------------------------------------------------ dense views

    @torch.no_grad()
    def dense_weight(self) -> torch.Tensor:
        """The effective dense ``m × n`` weight ``W0 + s·BA + S`` (materialised; for export and checks)."""
        work = work_dtype(self.A.dtype)
        weight = self.scale * (self.B.to(work) @ self.A.to(work))
        if self.base_weight is not None:
            weight += self.base_weight.to(work)
        if self.sparse_values is not None:
            weight += _scatter_dense(self.sparse_values.to(work), self.sparse_indices, self.out_features, self.in_features)
        return weight.to(self.A.dtype)

    @torch.no_grad()
    def to_dense(self, weight: torch.Tensor | None = None) -> nn.Module:
        """An ordinary ``nn.Linear`` (or ``Conv1D``, if that is what was replaced) with the same function,
        or, given an ``m × n`` ``weight`` (e.g. the frozen base alone), with that weight and this bias."""
        weight = self.dense_weight() if weight is None else weight.to(self.A.dtype)
        if self.source_type == "conv1d":
            dense = Conv1D(self.out_features, self.in_features).to(device=weight.device, dtype=weight.dtype)
            dense.weight.copy_(weight.T)
            if self.bias is not None:
                dense.bias.copy_(self.bias)
            else:
                dense.bias.zero_()
            return dense
        dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=weight.device, dtype=weight.dtype)
        dense.weight.copy_(weight)
        if self.bias is not None:
            dense.bias.copy_(self.bias)
        return dense

    def factor_parameters(self) -> list[nn.Parameter]:
        """The parameters whose coordinates change on :meth:`refactorize` or :meth:`merge`."""
        return [self.A, self.B]

    def extra_repr(self) -> str:
        parts = [f"in_features={self.in_features}", f"out_features={self.out_features}", f"rank={self.rank}"]
        if self.scale != 1.0:
            parts.append(f"scale={self.scale:g}")
        if self.base_weight is not None:
            parts.append("base=frozen")
        if self.sparse_values is not None:
            parts.append(f"sparse_density={self.sparse_values.numel() / (self.out_features * self.in_features):.4g}")
        parts.append(f"bias={self.bias is not None}")
        return ", ".join(parts)


def check_sparse_density(density: float) -> None:
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 <= density < 1.0:
        raise ValueError(
            f"sparse_density must be in [0, 1) (a fraction of the m×n entries; SLTrain uses 0.01–0.03; 0 turns the sparse "
            f"part off), got {density!r}"
        )


def check_init(init: str | None) -> None:
    if init is not None and init not in INITS:
        raise ValueError(f"init must be one of {', '.join(INITS)} (or None for the default), got {init!r}")


def check_sparse_init(sparse_init: str | None) -> None:
    if sparse_init is not None and sparse_init not in SPARSE_INITS:
        raise ValueError(f"sparse_init must be one of {', '.join(SPARSE_INITS)} (or None for the default), got {sparse_init!r}")


def check_rank(rank: int, out_features: int, in_features: int, where: str = "") -> None:
    limit = min(out_features, in_features)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 < rank <= limit:
        raise ValueError(
            f"{where}rank must be an integer in [1, min(m, n)] = [1, {limit}] for a {out_features}×{in_features} "
            f"layer, got {rank!r}; lower rank, use rank_ratio, or exclude the layer"
        )


def rank_from_ratio(ratio: float, out_features: int, in_features: int) -> int:
    """``rank_ratio`` of ``min(m, n)``, rounded, at least 1."""
    return max(1, math.floor(ratio * min(out_features, in_features) + 0.5))
