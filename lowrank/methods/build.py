"""A method applied: the wrapped model, the optimizer's parameter groups, the optimizer and the
restart controller, built the same way for ``lowrank pretrain``, the memory estimator, the
benchmarks and the Trainer integration."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UsageError
from ..optim import ProjectedAdamW
from ..optim.reset import DEFAULT_RESET_MOMENTS
from ..restarts import RestartController
from ..wrap import is_wrapped, lowrank_layers, match_target_modules, wrap
from .sections import Method

__all__ = ["apply_method", "param_groups", "build_optimizer", "build_controller", "check_projection_rank",
           "dense_adamw_override"]


def dense_adamw_override(optimizer_name: str, weight_dtype: torch.dtype, state_dtype: torch.dtype | None, *,
                         per_parameter: bool = False) -> dict:
    """The preset override that runs ``torch.optim.AdamW`` (the ``full_rank`` preset) as
    ProjectedAdamW with every option off — the same AdamW update — where torch's cannot serve:
    moments in another dtype than the weights (torch keeps them in the weights' dtype), or a step
    one parameter at a time (``per_parameter``: the optimizer step inside backward,
    :mod:`lowrank.run.layerwise`; bf16 weights, stepped in fp32 by :func:`lowrank.precision.step_bf16`),
    which needs ``step_param``. Empty when torch's AdamW serves."""
    if optimizer_name != "adamw":
        return {}
    if per_parameter or weight_dtype != torch.float32 or (state_dtype is not None and state_dtype != weight_dtype):
        return {"optimizer.name": "projected_adamw"}
    return {}


def apply_method(model: nn.Module, method: Method, *, seed: int = 0, lowrank: bool = True) -> nn.Module:
    """Give ``model`` the method's architecture, in place: OSP's norms and projections
    (``osp``), the low-rank layers (``lowrank``; skipped with ``lowrank=False``, e.g. during a
    dense warm start) and fake quantization (``quant``, on whatever layers are there: the dense
    ones, or the low-rank factors once wrapped). Each part that is already applied is left
    alone, so a call after a warm start adds only the wrap (re-applying fake quantization on
    the new layers)."""
    from ..osp import apply as apply_osp, is_osp
    from ..quant import apply_fake_quant, is_fake_quantized, remove_fake_quant

    if method.osp is not None and not is_osp(model):
        apply_osp(model, single_scale_norm=method.osp.single_scale_norm,
                  embedding_projection=method.osp.embedding_projection, seed=seed)
    config = method.lowrank_config(seed)
    if lowrank and config is not None and not is_wrapped(model):
        if is_fake_quantized(model):
            remove_fake_quant(model)  # quantize the factors that replace these layers instead
        try:
            wrap(model, config)
        except ValueError as error:
            raise UsageError(f"method {method.name}: {error}") from None
    if method.quant is not None and not is_fake_quantized(model):
        try:
            apply_fake_quant(model, method.quant.config(seed))
        except ValueError as error:
            raise UsageError(f"method {method.name}: quant: {error}") from None
    return model


def param_groups(model: nn.Module, method: Method) -> list[dict]:
    """Parameter groups: ``matrix`` (low-rank factors and sparse values, or the dense target
    matrices of projected-gradient methods; with Muon also OSP's embedding projections) with the
    preset's ``matrix`` options, and ``other``
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
    if settings.name == "muon":
        # OSP's embedding projections are hidden matrices for Muon, though they sit in the
        # embedding / head modules that the grouping above leaves to AdamW (lowrank.osp.projections).
        from ..osp import projections

        matrix_params += [p for p in projections(model) if p.requires_grad]
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
        if settings.name == "muon":
            return _muon(groups, settings, seed)
        return ProjectedAdamW(groups, seed=seed, **common)
    except ValueError as error:
        raise UsageError(f"method {method.name}: optimizer: {error}") from None


def _muon(groups: list[dict], settings, seed: int) -> torch.optim.Optimizer:
    """Muon over the ``matrix`` group's 2-D parameters (hidden matrices or low-rank factors), the
    AdamW half (ProjectedAdamW with the ``other`` options) over the rest; a 1-D parameter of the
    ``matrix`` group (SLTrain's sparse values) goes to a ProjectedAdamW group of its own."""
    from ..optim import Muon

    muon_groups = []
    for group in groups:
        if group["group_name"] != "matrix":
            muon_groups.append({**group, "use_muon": False})
            continue
        matrices = [p for p in group["params"] if p.dim() == 2]
        vectors = [p for p in group["params"] if p.dim() != 2]
        muon_groups.append({**group, "params": matrices, "use_muon": True})
        if vectors:
            muon_groups.append({"params": vectors, "group_name": "matrix_vectors", "use_muon": False,
                                **({"lr": group["lr"]} if "lr" in group else {})})
    return Muon(muon_groups, lr=settings.lr, weight_decay=settings.weight_decay,
                adamw={"betas": settings.betas, "eps": settings.eps, "seed": seed})


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
            reset_moments=restarts.reset_moments if restarts else DEFAULT_RESET_MOMENTS,
            rotate_moments=bool(restarts and layer_events and restarts.rotate_moments),
            warmup_steps=method.warmup_steps(total_steps),
            rewarmup_steps=restarts.rewarmup_steps if restarts else 0,
            min_lr_ratio=method.schedule.min_lr_ratio,
            manage_lr=manage_lr,
            start_step=start_step,
        )
    except ValueError as error:
        raise UsageError(f"method {method.name}: restarts: {error}") from None
