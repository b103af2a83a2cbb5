"""A method applied: the wrapped model, the optimizer's parameter groups, the optimizer and the
restart controller, built the same way for ``lowrank pretrain``, the memory estimator, the
benchmarks and the Trainer integration."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UsageError
from ..optim import ProjectedAdamW
from ..restarts import RestartController
from ..wrap import lowrank_layers, match_target_modules, wrap
from .sections import Method

__all__ = ["apply_method", "param_groups", "build_optimizer", "build_controller", "check_projection_rank"]


def apply_method(model: nn.Module, method: Method, *, seed: int = 0) -> nn.Module:
    """Wrap ``model`` with the method's low-rank layers (no-op for dense methods)."""
    config = method.lowrank_config(seed)
    if config is None:
        return model
    try:
        return wrap(model, config)
    except ValueError as error:
        raise UsageError(f"method {method.name}: {error}") from None


def param_groups(model: nn.Module, method: Method) -> list[dict]:
    """Parameter groups: ``matrix`` (low-rank factors and sparse values, or the dense target
    matrices of projected-gradient methods) with the preset's ``matrix`` options, and ``other``
    (embeddings, norms, head, biases) with its ``other`` options. Frozen parameters (a ReLoRA
    base) are left out: they get no optimizer state.

    The ``matrix`` group's learning rate is ``matrix_lr_ratio × lr``: at small scale the
    embeddings and head are most of the trainable parameters, and one shared lr can be right for
    them and wrong for the factors (or the reverse), so the ratio is a preset key of its own."""
    settings = method.optimizer
    matrix_params: list[nn.Parameter] = []
    layers = lowrank_layers(model)
    if layers:
        for layer in layers.values():
            matrix_params += [p for p in (layer.A, layer.B, layer.sparse_values) if p is not None and p.requires_grad]
    elif settings.target_modules:
        try:
            names = match_target_modules(model, settings.target_modules, settings.exclude_modules)
        except ValueError as error:
            raise UsageError(f"method {method.name}: optimizer.target_modules: {error}") from None
        for name in names:
            module = model.get_submodule(name)
            if isinstance(module, nn.Linear) and module.weight.requires_grad:
                matrix_params.append(module.weight)
    chosen = {id(p) for p in matrix_params}
    other_params = [p for p in model.parameters() if p.requires_grad and id(p) not in chosen]
    groups = []
    if matrix_params:
        matrix = {"params": matrix_params, "group_name": "matrix", **settings.matrix}
        if settings.matrix_lr_ratio != 1.0:
            matrix["lr"] = float(matrix.get("lr", settings.lr)) * settings.matrix_lr_ratio
        groups.append(matrix)
    if other_params:
        groups.append({"params": other_params, "group_name": "other", **settings.other})
    return groups


def build_optimizer(model: nn.Module, method: Method, *, seed: int = 0) -> torch.optim.Optimizer:
    """The preset's optimizer over :func:`param_groups`."""
    settings = method.optimizer
    common = {"lr": settings.lr, "betas": settings.betas, "eps": settings.eps, "weight_decay": settings.weight_decay}
    groups = param_groups(model, method)
    check_projection_rank(model, groups, method.name)
    try:
        if settings.name == "adamw":
            return torch.optim.AdamW(groups, foreach=True, **common)
        return ProjectedAdamW(groups, seed=seed, **common)
    except ValueError as error:
        raise UsageError(f"method {method.name}: optimizer: {error}") from None


def check_projection_rank(model: nn.Module, groups: list[dict], method: str) -> None:
    """A projection rank above a matrix's ``min(m, n)`` is a typo, not a request: refuse it
    (the optimizer alone would silently cap it)."""
    names = {id(p): n for n, p in model.named_parameters()}
    for group in groups:
        rank = group.get("rank")
        if group.get("projection") is None or rank is None:
            continue
        for p in group["params"]:
            if p.dim() == 2 and rank > min(p.shape):
                m, n = p.shape
                raise UsageError(
                    f"method {method}: rank {rank} is larger than {names.get(id(p), 'a matrix')} "
                    f"({m}×{n}, at most {min(m, n)}); lower --rank"
                )


def build_controller(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    method: Method,
    *,
    total_steps: int,
    start_step: int = 0,
    manage_lr: bool = True,
    layer_events: bool = True,
) -> RestartController:
    """The restart controller for the preset: its restarts (if any) and LR schedule on one clock.

    ``start_step``: the controller's clock starts there (a phase that begins mid-run, or a
    resumed run). ``layer_events=False`` keeps the clock and the LR schedule but runs no layer
    event or momentum reset (a ReLoRA warm start, before the model has factors to merge).
    """
    restarts = method.restarts
    try:
        return RestartController(
            model,
            optimizer,
            total_steps=total_steps,
            cycle_length=restarts.cycle_length if restarts else None,
            event=restarts.event if restarts and layer_events else "none",
            reset=restarts.reset if restarts and layer_events else "none",
            warmup_steps=method.warmup_steps(total_steps),
            rewarmup_steps=restarts.rewarmup_steps if restarts else 0,
            min_lr_ratio=method.schedule.min_lr_ratio,
            manage_lr=manage_lr,
            start_step=start_step,
        )
    except ValueError as error:
        raise UsageError(f"method {method.name}: restarts: {error}") from None
