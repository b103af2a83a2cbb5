"""The saliency-aware regularizer of ApiQ's retraining: the published form and ours.

**Published** (``saliency="fisher"``, the default): Cao & Aref 2025, "Enhancing Ultra-Low-Bit
Quantization of Large Language Models Through Saliency-Aware Partial Retraining" (arXiv
2504.13932), released code TokuyuSou/ULB-SAPR (``apiq/utils.py``,
``calculate_regularization_term`` with ``reg_method="before_lora"`` and
``use_gradient_weighting=True``; ``apiq/calibrate.py``'s training stages)::

    R = Σ_layers Σ_ij  F_ij · (Q(W) − W)²_ij         F = Σ_sequences (∂L_s/∂W)²

``Q(W)`` the learned-clipping quantized weight **before** the LoRA term (so only the clipping
logits receive its gradient), ``F`` the squared gradients of the full-precision model's
cross-entropy, summed over calibration sequences one at a time (a diagonal Fisher, as
SqueezeLLM computes it; :func:`fisher_scores`). It is applied only in the first
*weight-preservation* steps, which train ``λ R`` alone; the remaining *output-preservation*
steps train the block's output loss alone (their ``--wpt_epochs 15 --opt_epochs 5``; the
share of weight-preservation steps is the recipe's ``weight_preservation``). It needs learned
clipping: on frozen codes ``R`` is a constant.

**Ours** (``saliency="activation"`` or ``"gradient"``, DESIGN 2.13's earlier reading), at every
step, added to the output loss::

    R = (1/|layers|) Σ_layers  Σ_ij S_ij (W_eff − W)_ij²  /  Σ_ij S_ij W_ij²,     W_eff = Q(W) + s·BA

with ``S = |W|·‖X_{:,j}‖₂`` (Wanda, ``activation``) or ``S = |W ⊙ ∂L/∂W|`` (first-order Taylor,
``gradient``; :func:`taylor_scores`); dimensionless, so ``λ`` does not depend on the weights' scale.
"""

from __future__ import annotations

import torch
from torch import nn

from .apiq import QuantizedLowRankLinear
from .clipping import LearnedClipBase

__all__ = ["SALIENCY", "PUBLISHED", "fisher_scores", "taylor_scores", "FisherRegularizer", "RelativeRegularizer"]

SALIENCY = ("fisher", "activation", "gradient")
"""Saliency forms, the default (published) first: Fisher-weighted ``(Q(W) − W)²`` in the
weight-preservation steps; ours with Wanda's or the Taylor score at every step."""
PUBLISHED = "fisher"


def _weight_gradients(fp: nn.Module, targets: list[str], batches: list[torch.Tensor], reduce) -> dict[str, torch.Tensor]:
    """``reduce(total, grad)`` over the gradients of each target's weight, one per ``batches`` item."""
    weights = [fp.get_submodule(name).weight for name in targets]
    flags = [w.requires_grad for w in weights]
    for w in weights:
        w.requires_grad_(True)
    totals = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
    try:
        for ids in batches:
            loss = fp(input_ids=ids, labels=ids).loss
            for total, grad in zip(totals, torch.autograd.grad(loss, weights)):
                reduce(total, grad.float())
    finally:
        for w, flag in zip(weights, flags):
            w.requires_grad_(flag)
    return dict(zip(targets, totals))


def fisher_scores(fp: nn.Module, targets: list[str], batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """``F = Σ_s (∂L_s/∂W)²`` per target, ``L_s`` the mean cross-entropy of calibration sequence ``s``."""
    sequences = [row[None] for ids in batches for row in ids]
    return _weight_gradients(fp, targets, sequences, lambda total, grad: total.add_(grad.square()))


def taylor_scores(fp: nn.Module, targets: list[str], batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """``|W ⊙ ∂L/∂W|`` per target, ``L`` the mean cross-entropy over the calibration batches."""
    grads = _weight_gradients(fp, targets, batches, lambda total, grad: total.add_(grad / len(batches)))
    return {name: (fp.get_submodule(name).weight.detach().float() * g).abs() for name, g in grads.items()}


class FisherRegularizer:
    """The published ``R = Σ F (Q(W) − W)²`` over a block's layers (module docstring)."""

    def __init__(self, layers: dict[str, QuantizedLowRankLinear], fisher: dict[str, torch.Tensor]) -> None:
        for name, layer in layers.items():
            if not isinstance(layer.quantized_base, LearnedClipBase):
                raise ValueError(f"the published saliency regularizer acts on learned clipping; {name} has frozen codes")
        self.terms = [(layer.quantized_base, fisher[name].float()) for name, layer in layers.items()]

    def __call__(self) -> torch.Tensor:
        return sum((score * (base.weight() - base.full.float()).square()).sum() for base, score in self.terms)


class RelativeRegularizer:
    """Our ``R``: the mean over layers of ``Σ S (Q(W) + s·BA − W)² / Σ S W²`` (module docstring)."""

    def __init__(self, layers: dict[str, QuantizedLowRankLinear], weights: dict[str, torch.Tensor],
                 saliency: dict[str, torch.Tensor]) -> None:
        self.terms = []
        for name, layer in layers.items():
            weight, score = weights[name].detach().float(), saliency[name].float()
            self.terms.append((layer, weight, score, float((score * weight.square()).sum()) or 1.0))

    def __call__(self) -> torch.Tensor:
        total = sum((score * (layer.quantized_base.weight() + layer.delta_weight().float() - weight).square()).sum() / norm
                    for layer, weight, score, norm in self.terms)
        return total / len(self.terms)
