"""Peer optimizers, built through their own PyPI packages, for the benchmarks.

Every peer projects (or quantizes) the same matrices our presets target: the weights of the
attention and MLP linear layers (GaLore's scripts select modules whose name contains "attn" or
"mlp"; for LLaMA that is every linear layer but the head). Embeddings, norms and the head get the
peer's plain Adam, as in the peers' own training scripts.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

__all__ = ["PEERS", "PROJECTED_PEERS", "build_peer", "projected_groups", "split_targets"]

# GaLore's scripts project the weights of linear modules whose name contains one of these.
TARGET_KEYS = ("attn", "mlp")


def split_targets(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(projected attention/MLP linear weights, everything else), as the GaLore scripts split them."""
    targets = [
        m.weight
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and any(key in name for key in TARGET_KEYS) and m.weight.requires_grad
    ]
    ids = {id(p) for p in targets}
    return targets, [p for p in model.parameters() if id(p) not in ids and p.requires_grad]


def projected_groups(model: nn.Module, matrix_lr: float | None = None, **projected: Any) -> list[dict]:
    """Two parameter groups: everything else at the optimizer's lr, the projected matrices with the
    options ``projected`` and at ``matrix_lr`` when given (a peer's ``lr × matrix_lr_ratio``: the
    matrix/dense split our presets get, swept alike)."""
    targets, regular = split_targets(model)
    return [{"params": regular}, {"params": targets, **({"lr": matrix_lr} if matrix_lr is not None else {}), **projected}]


def _galore(model, lr, betas, weight_decay, rank, update_proj_gap, scale, matrix_lr):
    from galore_torch import GaLoreAdamW

    groups = projected_groups(model, matrix_lr, rank=rank, update_proj_gap=update_proj_gap, scale=scale, proj_type="std")
    return GaLoreAdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay)


def _fira(model, lr, betas, weight_decay, rank, update_proj_gap, scale, matrix_lr):
    from fira import FiraAdamW

    groups = projected_groups(model, matrix_lr, rank=rank, update_proj_gap=update_proj_gap, alpha=scale, proj_type="std")
    return FiraAdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay)


def _apollo(model, lr, betas, weight_decay, rank, update_proj_gap, scale, matrix_lr):
    from apollo_torch import APOLLOAdamW

    groups = projected_groups(model, matrix_lr, rank=rank, proj="random", scale_type="channel",
                              update_proj_gap=update_proj_gap, scale=scale, proj_type="std")
    return APOLLOAdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay)


def _apollo_mini(model, lr, betas, weight_decay, rank, update_proj_gap, scale, matrix_lr):
    from apollo_torch import APOLLOAdamW

    # APOLLO-Mini: rank 1, one scaling factor per tensor, scale 128 (the paper's setting).
    groups = projected_groups(model, matrix_lr, rank=1, proj="random", scale_type="tensor",
                              update_proj_gap=update_proj_gap, scale=128.0, proj_type="std")
    return APOLLOAdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay)


def _adamw8bit(model, lr, betas, weight_decay):
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit([p for p in model.parameters() if p.requires_grad], lr=lr, betas=betas,
                               weight_decay=weight_decay)


def _adam_mini(model, lr, betas, weight_decay):
    from adam_mini import Adam_mini

    config = model.config
    return Adam_mini(
        named_parameters=model.named_parameters(), lr=lr, betas=betas, weight_decay=weight_decay,
        dim=config.hidden_size, n_heads=config.num_attention_heads,
        n_kv_heads=getattr(config, "num_key_value_heads", None), verbose=False,
    )


def _torch_adamw(model, lr, betas, weight_decay):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, betas=betas,
                             weight_decay=weight_decay, foreach=True)


PROJECTED_PEERS = ("galore-torch", "fira", "apollo-torch", "apollo-torch-mini")
"""Peers with a group of projected matrices, whose lr can differ from the rest's (``matrix_lr_ratio``)."""

PEERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adamw": _torch_adamw,
    "galore-torch": _galore,
    "fira": _fira,
    "apollo-torch": _apollo,
    "apollo-torch-mini": _apollo_mini,
    "adamw8bit": _adamw8bit,
    "adam-mini": _adam_mini,
}


def build_peer(
    name: str,
    model: nn.Module,
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    weight_decay: float = 0.0,
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    matrix_lr_ratio: float = 1.0,
) -> torch.optim.Optimizer:
    """The peer optimizer ``name`` over ``model``'s trainable parameters; a projected peer's matrices
    at ``lr × matrix_lr_ratio`` (:data:`PROJECTED_PEERS`; the others have one group)."""
    if name not in PEERS:
        raise ValueError(f"unknown peer {name!r}; known: {', '.join(PEERS)}")
    if name in PROJECTED_PEERS:
        return PEERS[name](model, lr=lr, betas=tuple(betas), weight_decay=weight_decay, rank=rank,
                           update_proj_gap=update_proj_gap, scale=scale, matrix_lr=lr * matrix_lr_ratio)
    if matrix_lr_ratio != 1.0:
        raise ValueError(f"peer {name!r} has one parameter group: matrix_lr_ratio={matrix_lr_ratio} needs one of "
                         f"{', '.join(PROJECTED_PEERS)}")
    return PEERS[name](model, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
