"""The model a method trains, built directly in its storage dtype: each layer materialised,
factorized and cast in turn, so a 7B model in bf16 starts without its 25 GiB fp32 dense copy."""

from __future__ import annotations

import warnings

import torch
from torch import nn
from transformers import PretrainedConfig

from ..models import NotReproducible, build_model, materialize_model
from ..precision import store_parameters
from ..wrap import factorize_layer, lowrank_layers, mark_wrapped
from .build import apply_method
from .sections import Method

__all__ = ["build_method_model"]


def build_method_model(model_config: PretrainedConfig, method: Method, *, seed: int, dtype: torch.dtype = torch.float32,
                       device: torch.device | str = "cpu", lowrank: bool = True) -> nn.Module:
    """The model ``build_model(model_config, seed=seed)`` on ``device``, then
    ``apply_method(model, method, seed=seed, lowrank=lowrank)``, then every parameter cast to
    ``dtype`` gives — the same modules and names, the same values bit for bit (in bf16: the fp32
    values rounded to nearest once), the global RNG left in the same state — without ever
    holding the dense fp32 model.

    Algorithm: a ``meta`` build with the method applied says which layers are factorized, with
    which rank and index (and raises every error the real build would). Then
    :func:`lowrank.models.materialize_model` makes the dense model's values module by module,
    drawing from the global generator exactly as ``build_model`` does; as each module is done,
    it is moved to ``device``, replaced by its ``LowRankLinear`` if it is a target (the factors,
    the frozen base W0, the sparse part made from the dense weight by the code ``wrap`` runs, with
    the same per-layer seed), and its parameters cast to ``dtype``. At most a few modules' fp32
    values (a decoder block's MLP, the embedding until the end) exist at a time. OSP and fake
    quantization are applied last by ``apply_method`` (neither touches a factorized layer nor
    the global generator; OSP's new tensors are drawn in fp32 and cast once, as before).

    A model :func:`~lowrank.models.materialize_model` cannot reproduce (not a transformers model,
    a custom initialisation; :class:`~lowrank.models.NotReproducible`) is built the old way with a
    warning: dense first, then the method. ``device="meta"`` builds that way too (it allocates
    nothing). ``apply_method`` stays safe to call again on the result: each part it adds is
    there already.
    """
    device = torch.device(device)
    if device.type == "meta":
        return _build_then_apply(model_config, method, seed=seed, dtype=dtype, device=device, lowrank=lowrank)
    plan = _factorization_plan(model_config, method, seed=seed, lowrank=lowrank)
    config = method.lowrank_config(seed)

    def finish(name: str, module: nn.Module) -> nn.Module:
        module = module.to(device)  # its submodules are finished already: on the device, in dtype
        if name in plan:
            index, rank = plan[name]
            module = factorize_layer(module, rank, config, index)
        return store_parameters(module, dtype)

    try:
        model = materialize_model(model_config, seed=seed, finish=finish)
    except NotReproducible as reason:
        warnings.warn(f"building the dense {model_config.model_type} model first, then the method ({reason})", stacklevel=2)
        return _build_then_apply(model_config, method, seed=seed, dtype=dtype, device=device, lowrank=lowrank)
    if plan:
        if list(lowrank_layers(model)) != list(plan):
            raise RuntimeError(f"factorized {sorted(lowrank_layers(model))}, planned {sorted(plan)}")
        mark_wrapped(model, config)
    apply_method(model, method, seed=seed, lowrank=lowrank)  # OSP and fake quantization; the wrap is done
    return store_parameters(model, dtype)


def _factorization_plan(model_config: PretrainedConfig, method: Method, *, seed: int,
                        lowrank: bool) -> dict[str, tuple[int, int]]:
    """``{module name: (index in wrap's plan, rank)}`` of the layers ``apply_method`` factorizes,
    read off the method applied to a ``meta`` build, in module order."""
    skeleton = apply_method(build_model(model_config, device="meta"), method, seed=seed, lowrank=lowrank)
    return {name: (index, layer.rank) for index, (name, layer) in enumerate(lowrank_layers(skeleton).items())}


def _build_then_apply(model_config: PretrainedConfig, method: Method, *, seed: int, dtype: torch.dtype,
                      device: torch.device, lowrank: bool) -> nn.Module:
    """What :func:`build_method_model` reproduces: the dense fp32 model on ``device``, the method
    applied, the parameters cast to ``dtype``."""
    model = build_model(model_config, device=device, seed=seed)
    apply_method(model, method, seed=seed, lowrank=lowrank)
    return store_parameters(model, dtype)
