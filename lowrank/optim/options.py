"""ProjectedAdamW's options: each one's default, and the checks of a parameter group's values.

The defaults live here once (:data:`ADAM_DEFAULTS`, :data:`OPTION_DEFAULTS`); the constructor,
the method presets (:mod:`lowrank.methods.sections`), Muon's AdamW half and 1-bit Adam read them.
:func:`validate_group` runs when a group is added; :func:`check_step_hyperparameters` at every
step, because LR schedulers and user code assign ``group["lr"]`` after construction and a NaN
there would otherwise turn every weight NaN in silence; :func:`check_state_dict` before a load.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Collection, Mapping
from typing import Any

import torch

from ..errors import UsageError
from . import lowbit
from .layout import state_layout

PROJECTIONS = (None, "svd", "randomized", "random")
RESIDUALS = (None, "fira")
SCALE_TYPES = ("channel", "tensor")

# AdamW's own hyper-parameters (torch.optim.AdamW's defaults but weight decay 0, as the papers train).
ADAM_DEFAULTS: dict[str, Any] = {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}

# Every option a parameter group may set, with its default. ``lr``, ``betas``, ``eps`` and
# ``weight_decay`` are added by the constructor.
OPTION_DEFAULTS: dict[str, Any] = {
    "projection": None,
    "rank": 128,
    "update_proj_gap": 200,
    "scale": 1.0,
    "scale_type": "channel",
    "oversample": 8,
    "power_iters": 2,
    "residual": None,
    "reset_interval": 0,
    "reset_warmup": 0,
    "density": 1.0,
    "spike_threshold": 0.0,
    "spike_skip_steps": 20,
    "adaptive_clip": False,
    "norm_scaling": False,
    "gammas": (0.7, 0.9, 0.999),
    "seed": 0,
    "state_dtype": None,
    "state_bits": None,
    "foreach": None,
}

# Keys a parameter group may carry besides the options: its parameters, a label, what LR
# schedulers and the restart controller add, and lowrank.optim.Muon's flag for the AdamW groups it
# steps with this optimizer.
GROUP_BOOKKEEPING = frozenset({"params", "param_names", "group_name", "name", "base_lr", "initial_lr", "use_muon"})


def check_known_options(param_group: Mapping[str, Any], known: Collection[str], where: str) -> None:
    """Refuse a key that is neither an option nor bookkeeping, with the nearest option as a hint."""
    unknown = sorted(set(param_group) - set(known) - GROUP_BOOKKEEPING)
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(known), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; known options: {', '.join(sorted(known))}"
        raise ValueError(f"{where}: unknown option {unknown[0]!r}{hint}")


def validate_group(group: dict[str, Any], where: str) -> None:
    """Raise ``ValueError("param_groups[i]: <option> ...")`` for the first invalid option."""

    def fail(message: str) -> None:
        raise ValueError(f"{where}: {message}")

    def number(name: str) -> float:
        value = group[name]
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                fail(f"{name} must be a number, got a tensor of shape {tuple(value.shape)}")
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            fail(f"{name} must be a number, got {value!r}")
        return value

    def integer(name: str, minimum: int) -> None:
        value = group[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            fail(f"{name} must be an integer >= {minimum}, got {value!r}")

    def flag(name: str) -> None:
        if not isinstance(group[name], bool):
            fail(f"{name} must be True or False, got {group[name]!r}")

    for name in ("lr", "eps", "weight_decay", "spike_threshold"):
        value = number(name)
        if value < 0 or math.isinf(value):
            fail(f"{name} must be a finite number >= 0, got {group[name]}")
    for name, count in (("betas", 2), ("gammas", 3)):
        values = group[name]
        if not isinstance(values, (tuple, list)) or len(values) != count:
            fail(f"{name} must be a tuple of {count} numbers in [0, 1), got {values!r}")
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
                fail(f"{name} must be in [0, 1), got {values!r}")
    if group["projection"] not in PROJECTIONS:
        fail(f"projection must be one of {PROJECTIONS}, got {group['projection']!r}")
    if group["residual"] not in RESIDUALS:
        fail(f"residual must be one of {RESIDUALS}, got {group['residual']!r}")
    if group["scale_type"] not in SCALE_TYPES:
        fail(f"scale_type must be one of {SCALE_TYPES}, got {group['scale_type']!r}")
    integer("rank", 1)
    integer("update_proj_gap", 1)
    integer("oversample", 0)
    integer("power_iters", 0)
    integer("reset_interval", 0)
    integer("reset_warmup", 0)
    integer("spike_skip_steps", 0)
    integer("seed", 0)
    if group["seed"] >= 2**63:
        fail(f"seed must be < 2**63, got {group['seed']}")
    scale = number("scale")
    if not (scale > 0 and math.isfinite(scale)):
        fail(f"scale must be a finite number > 0, got {scale}")
    density = number("density")
    if not 0.0 < density <= 1.0:
        fail(f"density must be in (0, 1], got {density}")
    flag("adaptive_clip")
    flag("norm_scaling")
    if group["foreach"] is not None:
        flag("foreach")
    state_dtype = group["state_dtype"]
    if state_dtype is not None and not (isinstance(state_dtype, torch.dtype) and state_dtype.is_floating_point):
        fail(f"state_dtype must be None or a floating torch.dtype, got {state_dtype!r}")
    state_bits = group["state_bits"]
    if state_bits is not None and (type(state_bits) is not int or state_bits not in lowbit.BITS):
        fail(f"state_bits must be one of (None, {', '.join(map(str, lowbit.BITS))}), got {state_bits!r}")
    if group["residual"] is not None and group["projection"] not in ("svd", "randomized"):
        fail(f"residual={group['residual']!r} needs projection 'svd' or 'randomized', got {group['projection']!r}")
    if density < 1.0 and (group["projection"] == "random" or group["residual"] is not None):
        fail(
            f"density < 1 cannot be combined with projection={group['projection']!r} / "
            f"residual={group['residual']!r}: their per-channel norms need every entry of Adam(R)"
        )


def check_projection_rank(group: dict[str, Any], where: str) -> None:
    """A projection rank above a matrix's ``min(m, n)`` is refused, not silently capped."""
    if group["projection"] is None:
        return
    params = group["params"]
    params = [params] if isinstance(params, torch.Tensor) else list(params)
    for p in params:
        if isinstance(p, torch.Tensor) and p.dim() == 2 and group["rank"] > min(p.shape):
            raise ValueError(f"{where}: rank {group['rank']} is larger than a {p.shape[0]}×{p.shape[1]} matrix allows "
                             f"(at most {min(p.shape)}); lower rank or leave that matrix out of the group")


def check_step_hyperparameters(group: Mapping[str, Any], where: str, names: Collection[str] = ("lr", "weight_decay", "eps")) -> None:
    """At a step: each hyper-parameter in ``names`` that code may have reassigned since the group
    was validated (an LR schedule, a restart controller, a user) must still be a finite number
    >= 0, and ``betas`` (when the group has them) in ``[0, 1)``; else a one-line :class:`UsageError`
    naming the group and the value. Tensor values are not read (that would synchronise a GPU)."""
    for name in names:
        value = group[name]
        if isinstance(value, torch.Tensor):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
            raise UsageError(f"{where}: {name} must be a finite number >= 0 at the step, got {value!r} "
                             "(set after the optimizer was built, e.g. by an LR schedule)")
    betas = group.get("betas")
    if betas is not None and not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas):
        raise UsageError(f"{where}: betas must be two numbers in [0, 1) at the step, got {betas!r} "
                         "(set after the optimizer was built)")


def check_state_dict(optimizer: torch.optim.Optimizer, state_dict: Any) -> None:
    """What :meth:`ProjectedAdamW.load_state_dict` checks before it loads anything."""
    if not isinstance(state_dict, dict) or not isinstance(state_dict.get("state"), dict) \
            or not isinstance(state_dict.get("param_groups"), list):
        keys = sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__
        raise ValueError(f"load_state_dict: expected an optimizer.state_dict() with 'state' and 'param_groups', got {keys}")
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(optimizer.param_groups):
        raise ValueError(f"load_state_dict: the state dict has {len(saved_groups)} parameter groups, this optimizer "
                         f"{len(optimizer.param_groups)}; build the optimizer with the same groups")
    for index, (saved, group) in enumerate(zip(saved_groups, optimizer.param_groups)):
        ids = saved.get("params") if isinstance(saved, dict) else None
        if not isinstance(ids, list) or len(ids) != len(group["params"]):
            count = len(ids) if isinstance(ids, list) else "no"
            raise ValueError(f"load_state_dict: param_groups[{index}] has {count} parameters in the state dict and "
                             f"{len(group['params'])} here; build the optimizer over the same parameters")
        if group.get("use_muon"):
            continue  # Muon's own state, checked by its layout
        for saved_id, p in zip(ids, group["params"]):
            entry = state_dict["state"].get(saved_id)
            if not isinstance(entry, dict):
                continue
            expected = state_layout(tuple(p.shape), p.dtype, group).tensors()
            for key, value in entry.items():
                if torch.is_tensor(value) and key in expected and tuple(value.shape) != tuple(expected[key].shape):
                    raise ValueError(
                        f"load_state_dict: param_groups[{index}] parameter {tuple(p.shape)}: {key} has shape "
                        f"{tuple(value.shape)} in the state dict but {tuple(expected[key].shape)} here (saved with other "
                        "options, such as rank or density, or for another model)"
                    )
