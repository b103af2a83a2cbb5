r"""Adam's moments, bias correction and decoupled weight decay, as pure tensor functions.

AdamW (Kingma & Ba 2015, "Adam", Algorithm 1; Loshchilov & Hutter 2019, "Decoupled Weight Decay
Regularization", Algorithm 2), for a gradient ``g`` at step ``t`` (counted since the last reset)::

    m ← β1 m + (1 − β1) g                 v ← β2 v + (1 − β2) g²
    p ← p (1 − lr·wd) − lr · m̂ / (sqrt(v̂) + eps),   m̂ = m / (1 − β1ᵗ),  v̂ = v / (1 − β2ᵗ)

``eps`` is added to ``sqrt(v̂)``, torch's placement (GaLore adds it to ``sqrt(v)``).

Two evaluations of the same formula, each bit-stable on its own:

* per tensor (:func:`adam_moments_`, :func:`adam_direction`, :func:`adam_step_size`): the
  update is written ``step_size · m / (sqrt(v) + eps·sqrt(1 − β2ᵗ))`` with
  ``step_size = lr · sqrt(1 − β2ᵗ) / (1 − β1ᵗ)``, torch's expression rearranged so that the
  *direction* ``m / (sqrt(v) + eps')`` carries no bias factor: Fira's and APOLLO's norm ratios and
  the norm-growth limiter then see the quantity of their papers;
* multi-tensor (:func:`adamw_foreach_`): ``torch._foreach_*`` kernels, op for op torch's
  multi-tensor AdamW, so the result matches ``torch.optim.AdamW(foreach=True)`` to rounding.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


def decay_weights_(param: torch.Tensor, lr: float, weight_decay: float) -> None:
    """Decoupled weight decay, ``p ← p (1 − lr·wd)``, in place, on every entry."""
    if weight_decay != 0:
        param.mul_(1.0 - lr * weight_decay)


def adam_moments_(exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, grad: torch.Tensor, beta1: float, beta2: float) -> None:
    """``m ← β1 m + (1 − β1) g``, ``v ← β2 v + (1 − β2) g²``, in place."""
    exp_avg.lerp_(grad, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)


def adam_direction(exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step: int, beta2: float, eps: float,
                   dtype: torch.dtype) -> torch.Tensor:
    """``m / (sqrt(v) + eps·sqrt(1 − β2ᵗ))`` as a new tensor of ``dtype``: Adam's update without
    its bias factor, which :func:`adam_step_size` carries."""
    denom = exp_avg_sq.sqrt().add_(eps * math.sqrt(1.0 - beta2**step))
    return torch.div(exp_avg, denom, out=denom).to(dtype)


def adam_step_size(lr: float, step: int, beta1: float, beta2: float, warmup: float = 1.0) -> float:
    """``lr · sqrt(1 − β2ᵗ) / (1 − β1ᵗ)``, times the post-reset ``warmup`` factor
    (:func:`lowrank.optim.reset.warmup_factor`)."""
    return lr * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step) * warmup


def adamw_foreach_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[int],
    warmups: list[float],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """One AdamW step of many tensors at once with ``torch._foreach_*`` kernels, in place.

    ``grads`` have the moments' dtype; ``steps`` (Adam steps since each tensor's last reset,
    already counted for this step) and ``warmups`` enter as per-tensor scalars. Temporaries (the
    denominators, and the updates when ``params`` are in another dtype than the moments) are as
    large as all the tensors given: callers bound them by passing chunks.
    """
    if weight_decay != 0:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2)
    step_sizes = [-(lr / (1.0 - beta1**step)) * warmup for step, warmup in zip(steps, warmups)]
    bias2_sqrt = [math.sqrt(1.0 - beta2**step) for step in steps]
    denoms = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denoms, bias2_sqrt)
    torch._foreach_add_(denoms, eps)
    if params[0].dtype == exp_avgs[0].dtype:
        torch._foreach_addcdiv_(params, exp_avgs, denoms, step_sizes)
    else:
        updates = torch._foreach_div(exp_avgs, denoms)
        torch._foreach_mul_(updates, step_sizes)
        torch._foreach_add_(params, [u.to(params[0].dtype) for u in updates])


def foreach_chunks(params: list[torch.Tensor], max_numel: int) -> Iterable[list[torch.Tensor]]:
    """Consecutive runs of ``params`` holding at most ``max_numel`` elements (a larger tensor
    forms a run of its own): what bounds :func:`adamw_foreach_`'s temporaries."""
    chunk: list[torch.Tensor] = []
    size = 0
    for p in params:
        if chunk and size + p.numel() > max_numel:
            yield chunk
            chunk, size = [], 0
        chunk.append(p)
        size += p.numel()
    if chunk:
        yield chunk
