"""Training methods as presets: one YAML file per recipe, turned into a model, an optimizer and a
restart controller by the same code for the trainer, the memory estimator and the benchmarks.

A preset has these sections (all but ``optimizer`` optional)::

    description: one line
    lowrank:      LowRankConfig fields (rank, alpha, target_modules, keep_base, sparse_density, init,
                  ...) plus warm_start_steps; absent = dense model
    optimizer:    name (adamw | projected_adamw), lr, betas, eps, weight_decay,
                  matrix_lr_ratio (the matrix group's lr as a multiple of lr; default 1),
                  target_modules / exclude_modules (which dense matrices get `matrix` options),
                  matrix: {ProjectedAdamW options for the factor / target matrices},
                  other:  {ProjectedAdamW options for every other parameter}
    restarts:     cycle_length, event (auto | refactorize | merge | none),
                  reset (changed | all | none), rewarmup_steps
    schedule:     warmup (fraction of the run if < 1, else steps), min_lr_ratio
    training:     grad_clip
"""

from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from .errors import UsageError
from .models import config_dir
from .optim import ProjectedAdamW
from .optim.adamw import OPTION_DEFAULTS
from .restarts import EVENTS, RESETS, RestartController
from .wrap import LowRankConfig, lowrank_layers, match_target_modules, wrap

__all__ = [
    "Method",
    "available_methods",
    "load_method",
    "method_overrides",
    "apply_method",
    "param_groups",
    "build_optimizer",
    "build_controller",
]

_GROUP_OPTIONS = set(OPTION_DEFAULTS) | {"lr", "betas", "eps", "weight_decay"}
SCHEMA: dict[str, set[str] | None] = {
    "description": None,
    "lowrank": {
        "rank", "rank_ratio", "alpha", "target_modules", "exclude_modules", "keep_base",
        "sparse_density", "init", "sparse_init", "seed", "warm_start_steps",
    },
    "optimizer": {"name", "lr", "betas", "eps", "weight_decay", "matrix_lr_ratio", "target_modules", "exclude_modules",
                  "matrix", "other"},
    "restarts": {"cycle_length", "event", "reset", "rewarmup_steps"},
    "schedule": {"warmup", "min_lr_ratio"},
    "training": {"grad_clip"},
}
OPTIMIZERS = ("adamw", "projected_adamw")


@dataclass
class Method:
    """A parsed, validated preset."""

    name: str
    description: str = ""
    lowrank: dict | None = None
    optimizer: dict = field(default_factory=dict)
    restarts: dict | None = None
    schedule: dict = field(default_factory=lambda: {"warmup": 0.1, "min_lr_ratio": 0.1})
    training: dict = field(default_factory=lambda: {"grad_clip": 1.0})

    def lowrank_config(self, seed: int = 0) -> LowRankConfig | None:
        if not self.lowrank:
            return None
        options = {k: v for k, v in self.lowrank.items() if k != "warm_start_steps"}
        options.setdefault("seed", seed)
        try:
            return LowRankConfig(**options)
        except ValueError as error:
            raise UsageError(f"method {self.name}: lowrank: {error}") from None

    @property
    def warm_start_steps(self) -> int:
        return int((self.lowrank or {}).get("warm_start_steps", 0) or 0)

    def warmup_steps(self, total_steps: int) -> int:
        warmup = self.schedule.get("warmup", 0.1)
        return int(round(warmup * total_steps)) if warmup < 1 else int(warmup)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "description": self.description,
            "lowrank": copy.deepcopy(self.lowrank),
            "optimizer": copy.deepcopy(self.optimizer),
            "restarts": copy.deepcopy(self.restarts),
            "schedule": copy.deepcopy(self.schedule),
            "training": copy.deepcopy(self.training),
        }


def available_methods() -> list[str]:
    return sorted(path.stem for path in config_dir("methods").glob("*.yaml"))


def load_method(name_or_path: str | Path, overrides: dict[str, Any] | None = None) -> Method:
    """Read a bundled preset (``"galore"``) or a YAML file, apply dotted-key ``overrides``
    (``{"optimizer.lr": 3e-3, "lowrank.rank": 64}``) and validate every key.

    Raises:
        UsageError: unknown method, unreadable YAML, or a key that does not exist (the message
            suggests the closest valid one).
    """
    path = Path(name_or_path)
    bundled = config_dir("methods") / f"{name_or_path}.yaml"
    if bundled.is_file():
        path = bundled
    elif not path.is_file():
        close = difflib.get_close_matches(str(name_or_path), available_methods(), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UsageError(f"unknown method {str(name_or_path)!r}.{hint} Choose one of {', '.join(available_methods())} or a YAML path")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise UsageError(f"method file {path}: not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UsageError(f"method file {path}: expected a mapping of sections ({', '.join(SCHEMA)})")
    for dotted, value in (overrides or {}).items():
        _set_dotted(data, dotted, value)
    _validate(data, str(path))
    name = path.stem
    defaults = Method(name=name)
    return Method(
        name=name,
        description=str(data.get("description", "")).strip(),
        lowrank=data.get("lowrank"),
        optimizer=data["optimizer"],
        restarts=data.get("restarts"),
        schedule={**defaults.schedule, **(data.get("schedule") or {})},
        training={**defaults.training, **(data.get("training") or {})},
    )


def method_overrides(
    name_or_path: str | Path, *, rank: int | None = None, lr: float | None = None, cycle_length: int | None = None
) -> dict[str, Any]:
    """Command-line shortcuts as dotted preset keys, for :func:`load_method`'s ``overrides``.

    ``rank`` sets every rank the preset has: the factors' (``lowrank.rank``, clearing
    ``rank_ratio``) and the gradient projection's (``optimizer.matrix.rank``, only when the preset
    projects); a preset with neither ignores it. ``lr`` sets ``optimizer.lr``; ``cycle_length``
    sets ``restarts.cycle_length`` and needs a preset with restarts. Shared by ``lowrank pretrain``
    and ``lowrank memory`` so both read ``--rank`` the same way.

    Raises:
        UsageError: unknown method, or ``cycle_length`` for a preset without restarts.
    """
    base = load_method(name_or_path)
    overrides: dict[str, Any] = {}
    if lr is not None:
        overrides["optimizer.lr"] = lr
    if rank is not None:
        if base.lowrank is not None:
            overrides["lowrank.rank"] = rank
            overrides["lowrank.rank_ratio"] = None
        if (base.optimizer.get("matrix") or {}).get("projection"):
            overrides["optimizer.matrix.rank"] = rank
    if cycle_length is not None:
        if base.restarts is None:
            raise UsageError(f"--cycle-length: method {base.name} has no restarts section; pick a method with restarts")
        overrides["restarts.cycle_length"] = cycle_length
    return overrides


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        if node.get(key) is None:
            node[key] = {}
        node = node[key]
    node[keys[-1]] = value


def _unknown(key: str, known, where: str) -> UsageError:
    close = difflib.get_close_matches(key, sorted(known), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(sorted(known))}"
    return UsageError(f"{where}: unknown key {key!r}{hint}")


def _validate(data: dict, where: str) -> None:
    for section, value in data.items():
        if section not in SCHEMA:
            raise _unknown(section, SCHEMA, where)
        keys = SCHEMA[section]
        if keys is None or value is None:
            continue
        if not isinstance(value, dict):
            raise UsageError(f"{where}: section {section!r} must be a mapping, got {type(value).__name__}")
        for key, sub in value.items():
            if key not in keys:
                raise _unknown(key, keys, f"{where}: {section}")
            if section == "optimizer" and key in ("matrix", "other"):
                for option in sub or {}:
                    if option not in _GROUP_OPTIONS:
                        raise _unknown(option, _GROUP_OPTIONS, f"{where}: optimizer.{key}")
    optimizer = data.get("optimizer")
    if not optimizer or "lr" not in optimizer:
        raise UsageError(f"{where}: the optimizer section needs at least 'lr'")
    ratio = optimizer.get("matrix_lr_ratio", 1.0)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < float("inf"):
        raise UsageError(f"{where}: optimizer.matrix_lr_ratio must be a positive number (the matrix group's lr / lr), got {ratio!r}")
    name = optimizer.get("name", "projected_adamw")
    if name not in OPTIMIZERS:
        raise UsageError(f"{where}: optimizer.name must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
    if name == "adamw" and (optimizer.get("matrix") or optimizer.get("other")):
        raise UsageError(f"{where}: optimizer 'adamw' takes no matrix/other options; use name: projected_adamw")
    restarts = data.get("restarts") or {}
    if restarts.get("event", "auto") not in EVENTS:
        raise UsageError(f"{where}: restarts.event must be one of {', '.join(EVENTS)}")
    if restarts.get("reset", "changed") not in RESETS:
        raise UsageError(f"{where}: restarts.reset must be one of {', '.join(RESETS)}")


# ---------------------------------------------------------------------- building


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
    elif settings.get("target_modules"):
        try:
            names = match_target_modules(model, settings["target_modules"], settings.get("exclude_modules"))
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
        matrix = {"params": matrix_params, "group_name": "matrix", **(settings.get("matrix") or {})}
        ratio = float(settings.get("matrix_lr_ratio", 1.0))
        if ratio != 1.0:
            matrix["lr"] = float(matrix.get("lr", settings["lr"])) * ratio
        groups.append(matrix)
    if other_params:
        groups.append({"params": other_params, "group_name": "other", **(settings.get("other") or {})})
    return groups


def build_optimizer(model: nn.Module, method: Method, *, seed: int = 0) -> torch.optim.Optimizer:
    """The preset's optimizer over :func:`param_groups`."""
    settings = method.optimizer
    common = {
        "lr": float(settings["lr"]),
        "betas": tuple(settings.get("betas", (0.9, 0.999))),
        "eps": float(settings.get("eps", 1e-8)),
        "weight_decay": float(settings.get("weight_decay", 0.0)),
    }
    groups = param_groups(model, method)
    _check_projection_rank(model, groups, method.name)
    try:
        if settings.get("name", "projected_adamw") == "adamw":
            return torch.optim.AdamW(groups, foreach=True, **common)
        return ProjectedAdamW(groups, seed=seed, **common)
    except ValueError as error:
        raise UsageError(f"method {method.name}: optimizer: {error}") from None


def _check_projection_rank(model: nn.Module, groups: list[dict], method: str) -> None:
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
    manage_lr: bool = True,
    layer_events: bool = True,
) -> RestartController:
    """The restart controller for the preset: its restarts (if any) and LR schedule on one clock.

    ``layer_events=False`` keeps the clock and the LR schedule but runs no layer event or
    momentum reset (a ReLoRA warm start, before the model has factors to merge).
    """
    restarts = method.restarts or {}
    try:
        return RestartController(
            model,
            optimizer,
            total_steps=total_steps,
            cycle_length=restarts.get("cycle_length") if restarts else None,
            event=restarts.get("event", "auto") if layer_events else "none",
            reset=restarts.get("reset", "changed") if layer_events else "none",
            warmup_steps=method.warmup_steps(total_steps),
            rewarmup_steps=restarts.get("rewarmup_steps", 0),
            min_lr_ratio=method.schedule.get("min_lr_ratio", 0.1),
            manage_lr=manage_lr,
        )
    except ValueError as error:
        raise UsageError(f"method {method.name}: restarts: {error}") from None

