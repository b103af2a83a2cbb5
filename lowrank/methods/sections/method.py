"""A whole preset: :class:`Method`, its sections, and the dotted-key overrides (``--set``)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ...errors import UsageError
from ...wrap import LowRankConfig
from .base import _unknown
from .lowrank import LowRankSection
from .optimizer import OptimizerSection
from .osp import OSPSection
from .quant import QuantSection
from .restarts import RestartsSection
from .schedule import ScheduleSection
from .training import TrainingSection

_SECTIONS = {"lowrank": LowRankSection, "optimizer": OptimizerSection, "restarts": RestartsSection,
             "schedule": ScheduleSection, "training": TrainingSection, "osp": OSPSection, "quant": QuantSection}
_TOP_LEVEL = {"description", *_SECTIONS}


@dataclass(frozen=True)
class Method:
    """A parsed, validated preset. Build one with :func:`lowrank.methods.load_method` or
    :meth:`from_dict`; change one with :meth:`with_overrides`."""

    name: str
    optimizer: OptimizerSection
    description: str = ""
    lowrank: LowRankSection | None = None
    restarts: RestartsSection | None = None
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    osp: OSPSection | None = None
    quant: QuantSection | None = None

    def __post_init__(self) -> None:
        # Method(**method.to_dict()) — e.g. from a checkpoint's meta.json — parses the dict form.
        for name, cls in _SECTIONS.items():
            value = getattr(self, name)
            if value is not None and not isinstance(value, cls):
                object.__setattr__(self, name, cls.parse(value, f"method {self.name}"))

    # ------------------------------------------------------------------ parsing

    @classmethod
    def from_dict(cls, name: str, data: Any, where: str | None = None) -> Method:
        """Parse a preset's mapping (YAML or ``to_dict()`` form), validating every key and value."""
        where = where or f"method {name}"
        if not isinstance(data, Mapping):
            raise UsageError(f"{where}: expected a mapping of sections ({', '.join(sorted(_TOP_LEVEL))}), got {type(data).__name__}")
        data = {k: v for k, v in data.items() if k != "name"}
        for key in data:
            if key not in _TOP_LEVEL:
                raise _unknown(str(key), _TOP_LEVEL, where)
        if not data.get("optimizer") or not isinstance(data["optimizer"], Mapping) or "lr" not in data["optimizer"]:
            if data.get("optimizer") is not None and not isinstance(data["optimizer"], Mapping):
                OptimizerSection.parse(data["optimizer"], where)  # the "must be a mapping" message
            raise UsageError(f"{where}: the optimizer section needs at least 'lr'")
        sections = {key: _SECTIONS[key].parse(data[key], where) for key in _SECTIONS if data.get(key) is not None}
        description = data.get("description") or ""
        if not isinstance(description, str):
            raise UsageError(f"{where}: description must be a line of text, got {description!r}")
        return cls(name=name, description=description.strip(), **sections)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON / YAML), every default written out; ``Method(**d)`` and
        :meth:`from_dict` read it back."""
        return {
            "name": self.name,
            "description": self.description,
            **{key: (getattr(self, key).to_dict() if getattr(self, key) is not None else None) for key in _SECTIONS},
        }

    # ------------------------------------------------------------------ changing a method

    def shortcut_overrides(self, *, rank: int | None = None, lr: float | None = None,
                           cycle_length: int | None = None) -> dict[str, Any]:
        """The command-line shortcuts as dotted keys: the one place their rules live.

        ``rank`` sets every rank the method has: the factors' (``lowrank.rank``, clearing
        ``rank_ratio``) and the gradient projection's (``optimizer.matrix.rank``, only when the
        method projects); a method with neither ignores it. ``lr`` sets ``optimizer.lr``;
        ``cycle_length`` sets ``restarts.cycle_length`` and needs a method with restarts.
        """
        overrides: dict[str, Any] = {}
        if lr is not None:
            overrides["optimizer.lr"] = lr
        if rank is not None:
            if self.lowrank is not None:
                overrides["lowrank.rank"] = rank
                overrides["lowrank.rank_ratio"] = None
            if self.optimizer.matrix.get("projection"):
                overrides["optimizer.matrix.rank"] = rank
        if cycle_length is not None:
            if self.restarts is None:
                raise UsageError(f"--cycle-length: method {self.name} has no restarts section; pick a method with restarts")
            overrides["restarts.cycle_length"] = cycle_length
        return overrides

    def with_overrides(self, overrides: Mapping[str, Any] | None = None, *, rank: int | None = None,
                       lr: float | None = None, cycle_length: int | None = None) -> Method:
        """A copy with dotted-key ``overrides`` (``{"optimizer.lr": 3e-3}``) and the shortcuts
        applied, validated like a preset. A shortcut and a dotted key that set the same value
        differently are refused (neither silently wins)."""
        overrides = dict(overrides or {})
        method = self._with_dotted(overrides) if overrides else self
        # The shortcuts read the method as overridden (a --set may add a restarts section).
        shortcuts = method.shortcut_overrides(rank=rank, lr=lr, cycle_length=cycle_length)
        flags = {"optimizer.lr": "--lr", "lowrank.rank": "--rank", "optimizer.matrix.rank": "--rank",
                 "restarts.cycle_length": "--cycle-length"}
        for key, value in shortcuts.items():
            if key in overrides and overrides[key] != value:
                raise UsageError(f"{flags.get(key, key)} {value} and --set {key}={overrides[key]} disagree; give one of them")
        return method._with_dotted(shortcuts) if shortcuts else method

    def _with_dotted(self, dotted: Mapping[str, Any]) -> Method:
        data = self.to_dict()
        for key, value in dotted.items():
            set_dotted(data, key, value)
        return Method.from_dict(self.name, data)

    # ------------------------------------------------------------------ derived values

    def lowrank_config(self, seed: int = 0) -> LowRankConfig | None:
        return None if self.lowrank is None else self.lowrank.config(seed)

    @property
    def warm_start_steps(self) -> int:
        return self.lowrank.warm_start_steps if self.lowrank is not None else 0

    def warmup_steps(self, total_steps: int) -> int:
        return self.schedule.warmup_steps(total_steps)


def set_dotted(data: dict, dotted: str, value: Any) -> None:
    """``set_dotted(d, "optimizer.matrix.rank", 64)`` on the dict form of a method."""
    if not isinstance(dotted, str) or not dotted or any(not part for part in dotted.split(".")):
        raise UsageError(f"--set {dotted!r}: expected a dotted key such as optimizer.lr")
    keys = dotted.split(".")
    node = data
    for depth, key in enumerate(keys[:-1]):
        if node.get(key) is None:
            node[key] = {}
        elif not isinstance(node[key], dict):
            where = ".".join(keys[: depth + 1])
            raise UsageError(f"--set {dotted}: {where} is {node[key]!r}, not a section with keys")
        node = node[key]
    node[keys[-1]] = copy.deepcopy(value)
