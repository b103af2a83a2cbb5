"""ApiQ's partial retraining of one decoder block (ApiQ-bw, Liao et al. 2024 §3; released
``apiq/calibrate.py``), as a :class:`~lowrank.quant.recipes.Recipe` configures it.

The block's quantized layers train their factors ``A``, ``B`` and, with learned clipping, their
clipping logits (:mod:`lowrank.quant.clipping`), with AdamW in two parameter groups (the
recipe's ``lr`` / ``weight_decay`` and ``clip_lr`` / ``clip_weight_decay``), one calibration
batch per step in turn, so the quantized block fed the quantized model's stream ``h_q``
reproduces the full-precision block's output on the full-precision stream::

    relative:  ‖f_q(h_q) − f(h)‖² / ‖f(h)‖²          mse:  mean((f_q(h_q) − f(h))²)
    aug_loss:  + the same against f(h_q)              (ApiQ's ``--aug_loss``)

Learning rate: ``cosine`` (10 % linear warm-up, then cosine to 0) or ``constant``; the gradient
norm is clipped at ``grad_clip`` unless it is ``None``. A saliency regularizer (:mod:`lowrank.quant.saliency`)
either replaces the output loss in the first weight-preservation steps (the published form) or is
added to it at every step with weight ``λ`` (ours).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from .apiq import QuantizedLowRankLinear
from .clipping import LearnedClipBase
from .recipes import Recipe

__all__ = ["run_block", "relative_error", "block_loss", "train_block"]


def run_block(block: nn.Module, hidden: torch.Tensor, call: tuple) -> torch.Tensor:
    """The block's hidden-state output for ``hidden`` and the recorded ``(args, kwargs)`` of its call."""
    args, kwargs = call
    output = block(hidden, *args, **kwargs)
    return output[0] if isinstance(output, (tuple, list)) else output


def relative_error(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``‖output − target‖² / ‖target‖²``."""
    return (output.float() - target.float()).square().sum() / target.float().square().sum().clamp_min(1e-30)


def block_loss(kind: str, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The recipe's block loss: ``relative`` or ``mse`` (module docstring)."""
    if kind == "mse":
        return (output.float() - target.float()).square().mean()
    return relative_error(output, target)


def _schedule(kind: str, steps: int) -> Callable[[int], float]:
    if kind == "constant":
        return lambda t: 1.0
    warmup = max(1, steps // 10)
    return lambda t: min(1.0, (t + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(t, steps) / steps))


def train_block(q_block: nn.Module, layers: dict[str, QuantizedLowRankLinear], h_q: list, targets: list,
                aug_targets: list | None, calls: list, *, recipe: Recipe, steps: int, reg_lambda: float,
                regularizer: Callable[[], torch.Tensor] | None, weight_steps: int) -> list[dict]:
    """Retrain ``layers`` (and nothing else) of ``q_block`` for ``steps`` steps (module docstring).

    ``weight_steps``: the first steps train ``reg_lambda · regularizer()`` alone (the published
    saliency form); with ``weight_steps = 0`` a regularizer is added to every step's loss.
    Returns one ``{"step", "phase", "loss", "regularizer"}`` row per step (``loss`` ``None`` in a
    weight-preservation step, ``regularizer`` ``None`` where it was not computed)."""
    factors = [p for layer in layers.values() for p in (layer.A, layer.B)]
    clips = [p for layer in layers.values() if isinstance(layer.quantized_base, LearnedClipBase)
             for p in (layer.quantized_base.up, layer.quantized_base.low)]
    for p in factors + clips:
        p.requires_grad_(True)
    groups = [{"params": factors, "lr": recipe.lr, "weight_decay": recipe.weight_decay}]
    if clips:
        groups.append({"params": clips, "lr": recipe.clip_lr, "weight_decay": recipe.clip_weight_decay})
    optimizer = torch.optim.AdamW(groups)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(recipe.schedule, steps))
    history = []
    with torch.enable_grad():
        for step in range(steps):
            j = step % len(h_q)
            if step < weight_steps:
                loss, penalty = None, regularizer()
                total = reg_lambda * penalty
            else:
                output = run_block(q_block, h_q[j], calls[j])
                loss = block_loss(recipe.loss, output, targets[j])
                if aug_targets is not None:
                    loss = loss + block_loss(recipe.loss, output, aug_targets[j])
                penalty = regularizer() if regularizer is not None and not weight_steps else None
                total = loss if penalty is None else loss + reg_lambda * penalty
            total.backward()
            if recipe.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(factors + clips, recipe.grad_clip)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            history.append({"step": step + 1, "phase": "weight" if step < weight_steps else "output",
                            "loss": None if loss is None else loss.item(),
                            "regularizer": None if penalty is None else penalty.item()})
    return history
