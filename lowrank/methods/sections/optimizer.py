"""The ``optimizer`` section: which optimizer, its hyper-parameters and per-group options, checked
against the optimizers' own rules (:func:`lowrank.optim.validate_group`, :func:`lowrank.optim.muon.validate_muon_group`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ...dtypes import parse_dtype
from ...errors import UsageError
from ...optim.muon import MUON_DEFAULTS, validate_muon_group
from ...optim.options import ADAM_DEFAULTS, OPTION_DEFAULTS, validate_group
from .base import SectionView, _Check, _unknown

OPTIMIZERS = ("projected_adamw", "adamw", "muon")
"""``projected_adamw``: :class:`lowrank.optim.ProjectedAdamW`; ``adamw``: ``torch.optim.AdamW``;
``muon``: :class:`lowrank.optim.Muon` on the ``matrix`` group, ProjectedAdamW on ``other``."""

GROUP_OPTIONS = frozenset(OPTION_DEFAULTS) | {"lr", "betas", "eps", "weight_decay"}
"""Keys a ProjectedAdamW group may set: every ProjectedAdamW group option."""

MUON_GROUP_OPTIONS = frozenset(MUON_DEFAULTS) | {"lr", "weight_decay", "state_dtype"}
"""Keys the ``matrix`` group of a ``muon`` optimizer may set: Muon's options."""


def _group_options(value: Any, where: str, key: str) -> dict[str, Any]:
    """A ``matrix`` / ``other`` mapping of ProjectedAdamW group options (values checked later,
    against the optimizer's own rules, in :meth:`OptimizerSection.check`)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise UsageError(f"{where}: {key} must be a mapping of ProjectedAdamW options, got {value!r}")
    options = {}
    for option, setting in value.items():
        if option not in GROUP_OPTIONS | MUON_GROUP_OPTIONS:
            raise _unknown(str(option), GROUP_OPTIONS, f"{where}: {key}")
        options[option] = parse_dtype(setting, f"{where}: {key}.{option}") if option == "state_dtype" else setting
    return options


@dataclass(frozen=True)
class OptimizerSection(SectionView):
    """The optimizer.

    * ``name``: one of :data:`OPTIMIZERS`.
    * ``lr``: the peak learning rate (the schedule scales it); ``betas``, ``eps``,
      ``weight_decay``: AdamW's (defaults: ProjectedAdamW's).
    * ``matrix_lr_ratio``: the ``matrix`` group's learning rate as a multiple of ``lr``.
    * ``target_modules`` / ``exclude_modules``: for a dense model, which linear layers' weights
      form the ``matrix`` group (PEFT's rules); with low-rank layers the factors do.
    * ``matrix`` / ``other``: ProjectedAdamW options for the ``matrix`` group and for every other
      parameter (embeddings, norms, head, biases). With ``name: muon`` the ``matrix`` group takes
      Muon's options instead (``momentum``, ``nesterov``, ``ns_steps``, ``adjust_lr``, ...), and
      ``betas`` / ``eps`` are those of the AdamW half.
    """

    lr: float
    name: str = "projected_adamw"
    betas: tuple[float, float] = ADAM_DEFAULTS["betas"]
    eps: float = ADAM_DEFAULTS["eps"]
    weight_decay: float = ADAM_DEFAULTS["weight_decay"]
    matrix_lr_ratio: float = 1.0
    target_modules: str | list[str] | None = None
    exclude_modules: str | list[str] | None = None
    matrix: dict[str, Any] = field(default_factory=dict)
    other: dict[str, Any] = field(default_factory=dict)

    NAME = "optimizer"
    CHECKS = {
        "name": _Check.choice(OPTIMIZERS),
        "lr": _Check.number(0.0, low_open=True),
        "betas": _Check.pair(),
        "eps": _Check.number(0.0),
        "weight_decay": _Check.number(0.0),
        "matrix_lr_ratio": _Check.number(0.0, low_open=True),
        "target_modules": _Check.optional(_Check.patterns()),
        "exclude_modules": _Check.optional(_Check.patterns()),
        "matrix": _group_options,
        "other": _group_options,
    }

    def check(self, where: str) -> None:
        if self.name == "adamw" and (self.matrix or self.other):
            raise UsageError(f"{where}: optimizer 'adamw' takes no matrix/other options; use name: projected_adamw")
        common = {"lr": self.lr, "betas": self.betas, "eps": self.eps, "weight_decay": self.weight_decay}
        for group in ("matrix", "other"):
            options = getattr(self, group)
            try:
                if group == "matrix" and self.name == "muon":
                    unknown = sorted(set(options) - MUON_GROUP_OPTIONS)
                    if unknown:
                        raise _unknown(unknown[0], MUON_GROUP_OPTIONS, f"{where}: optimizer.matrix (Muon)")
                    validate_muon_group({**MUON_DEFAULTS, "lr": self.lr, "weight_decay": self.weight_decay,
                                         "state_dtype": None, **options, "params": []}, f"{where}: optimizer.matrix")
                    continue
                muon_only = sorted(set(options) - GROUP_OPTIONS)
                if muon_only:
                    raise _unknown(muon_only[0], GROUP_OPTIONS, f"{where}: optimizer.{group}")
                validate_group({**OPTION_DEFAULTS, **common, **options}, f"{where}: optimizer.{group}")
            except ValueError as error:
                raise UsageError(str(error)) from None
