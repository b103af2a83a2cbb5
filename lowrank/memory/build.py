"""One way to turn (model config, method, rank, dtypes) into a model and an optimizer, shared by
the estimator (on the ``meta`` device) and the profiler (on a real one), so that both describe
the same objects ``lowrank pretrain`` would build: the same preset, the same ``--rank`` rule
(:meth:`lowrank.methods.Method.with_overrides`), the same wrapping and parameter groups."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import PretrainedConfig

from ..dtypes import DTYPES, dtype_name, parse_dtype
from ..errors import UsageError
from ..methods import (Method, apply_method, available_methods, build_method_model, build_optimizer, dense_adamw_override,
                       load_method)
from ..models import build_model, load_model_config
from ..precision import store_parameters
from .peers import PEERS, Peer, build_adamw8bit

__all__ = ["DTYPES", "Resolved", "available", "parse_dtype", "dtype_name", "resolve", "build"]


def available() -> list[str]:
    """Every method name the memory tools accept: the presets, then the peers."""
    return available_methods() + list(PEERS)


@dataclass
class Resolved:
    """A method ready to build: a preset (``method``) or a peer (``peer``), and what was used."""

    name: str
    method: Method | None
    peer: Peer | None
    rank: int | None
    optimizer: str
    notes: list[str] = field(default_factory=list)
    # the optimizer steps inside backward (--layerwise-step); a peer's steps all at once whatever was asked
    layerwise: bool = False


def resolve(name: str | Path, *, rank: int | None = None, weight_dtype: torch.dtype = torch.float32,
            state_dtype: torch.dtype | None = None, layerwise: bool = False) -> Resolved:
    """Read the preset (or peer) ``name`` with ``rank`` and ``state_dtype`` applied.

    ``state_dtype`` becomes ProjectedAdamW's ``state_dtype`` for every group. ``torch.optim.AdamW``
    (the ``full_rank`` preset) keeps its moments in the parameter dtype and has no per-parameter
    step; when ``state_dtype`` differs from ``weight_dtype``, or the step runs inside backward
    (``layerwise``, ``--layerwise-step``), the baseline runs as ProjectedAdamW with every option
    off (the same AdamW update), by the rule the trainer uses
    (:func:`lowrank.methods.dense_adamw_override`), so that, e.g., bf16 weights get fp32 moments as
    mixed-precision recipes do. A peer (bitsandbytes) has no per-parameter step: ``layerwise``
    does not apply to it (``Resolved.layerwise`` is then ``False``, with a note).
    """
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
        raise UsageError(f"--rank must be a positive integer, got {rank!r}")
    key = str(name)
    if key in PEERS:
        notes = [f"--rank does not apply to {key} (dense weights, no projection)"] if rank is not None else []
        if state_dtype is not None:
            notes.append("8-bit moments (tensors under 4096 elements: fp32); --state-dtype does not apply")
        if layerwise:
            notes.append("--layerwise-step does not apply (bitsandbytes steps every parameter at once): the whole "
                         "gradient set is held")
        return Resolved(key, None, PEERS[key], None, PEERS[key].optimizer, notes)
    if key not in available_methods() and not Path(key).is_file():
        close = difflib.get_close_matches(key, available(), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UsageError(f"unknown method {key!r}.{hint} Choose from {', '.join(available())} or a preset YAML path")
    base = load_method(key)
    optimizer_name = base.optimizer.name
    overrides: dict = {}
    notes = []
    override = dense_adamw_override(optimizer_name, weight_dtype, state_dtype, per_parameter=layerwise)
    if override:
        overrides.update(override)
        optimizer_name = override["optimizer.name"]
        notes.append(_dense_adamw_note(weight_dtype, state_dtype, layerwise))
    if state_dtype is not None:
        if optimizer_name == "projected_adamw":
            overrides["optimizer.matrix.state_dtype"] = state_dtype
            overrides["optimizer.other.state_dtype"] = state_dtype
    method = base.with_overrides(overrides, rank=rank)
    used_rank = None
    if method.lowrank is not None:
        used_rank = method.lowrank.rank
    elif method.optimizer.matrix.get("projection"):
        from ..optim import OPTION_DEFAULTS

        used_rank = method.optimizer.matrix.get("rank", OPTION_DEFAULTS["rank"])
    label = "torch.optim.AdamW" if optimizer_name == "adamw" else "lowrank.optim.ProjectedAdamW"
    return Resolved(method.name, method, None, used_rank, label, notes, layerwise=layerwise)


def _dense_adamw_note(weight_dtype: torch.dtype, state_dtype: torch.dtype | None, layerwise: bool) -> str:
    """Why ``full_rank``'s AdamW runs as ProjectedAdamW: the reasons of :func:`dense_adamw_override`."""
    reasons = []
    if weight_dtype != torch.float32 or (state_dtype is not None and state_dtype != weight_dtype):
        reasons.append("torch.optim.AdamW keeps moments in the weight dtype")
    if layerwise:
        reasons.append("--layerwise-step steps one parameter at a time inside backward (step_param)")
    return (f"AdamW with {dtype_name(state_dtype or torch.float32)} moments as ProjectedAdamW (options off), "
            f"as lowrank pretrain runs it: {'; '.join(reasons)}")


def check_size(name: str, value: int) -> None:
    """A batch size or sequence length: a positive integer."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UsageError(f"{name} must be a positive integer, got {value!r}")


def load_config(model_config: str | Path | PretrainedConfig) -> tuple[PretrainedConfig, str]:
    if isinstance(model_config, PretrainedConfig):
        return model_config, getattr(model_config, "name_or_path", "") or model_config.model_type
    return load_model_config(str(model_config)), Path(str(model_config)).stem


def build(config: PretrainedConfig, resolved: Resolved, *, device: torch.device | str = "meta",
          weight_dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer | None]:
    """The model (wrapped per the method) in ``weight_dtype`` on ``device``, and its optimizer.

    On ``meta`` nothing is allocated; a peer's optimizer is not built there (its layout is
    computed from the parameters). Raises :class:`UsageError` when the rank does not fit a layer,
    for low-rank factors (the wrap refuses) and for gradient projection alike (ProjectedAdamW
    would silently use ``min(m, n)``, a rank the user did not ask for).
    """
    meta = str(device) == "meta"
    if meta:
        model = build_model(config, device="meta")
        if resolved.method is not None:
            apply_method(model, resolved.method, seed=seed)
        store_parameters(model, weight_dtype)
    elif resolved.method is not None:
        # As the trainer builds it: layer by layer in weight_dtype, never the dense fp32 model whole.
        model = build_method_model(config, resolved.method, seed=seed, dtype=weight_dtype, device=device)
    else:
        model = store_parameters(build_model(config, seed=seed), weight_dtype).to(device)
    if resolved.peer is not None:
        if meta:
            return model, None
        return model, build_adamw8bit([p for p in model.parameters() if p.requires_grad])
    return model, build_optimizer(model, resolved.method, seed=seed)
