"""A method preset as typed sections: every key's type, range and default in one place.

A preset (``configs/methods/*.yaml``) has these sections, all but ``optimizer`` optional::

    description: one line
    lowrank:    LowRankSection   — how the model is factorized (absent: a dense model)
    optimizer:  OptimizerSection — which optimizer, its hyper-parameters, per-group options
    restarts:   RestartsSection  — the restart clock (absent: no restarts)
    schedule:   ScheduleSection  — warm-up and cosine floor
    training:   TrainingSection  — gradient clipping, non-finite and dead steps
    osp:        OSPSection       — Outlier-Safe Pre-Training's architecture changes (absent: none)
    quant:      QuantSection     — fake-quantized (e.g. 4-bit) training (absent: full precision)

:meth:`Method.from_dict` validates every value where it enters (type, range, choices; a
misspelled key gets a "did you mean"), so a bad preset or ``--set`` fails before any work with a
one-line :class:`~lowrank.errors.UsageError` naming the key. :meth:`Method.with_overrides` is the
one way to change a method (``--rank``, ``--lr``, ``--cycle-length`` and dotted ``--set`` keys),
used by the command line, the memory estimator, the benchmarks and the Trainer integration.

Sections are frozen dataclasses and also read-only mappings of their fields (``section["lr"]``,
``section.get("rank")``), so code written against the dict form of earlier versions keeps working.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Callable

import torch

from ..dtypes import dtype_name, parse_dtype
from ..errors import UsageError
from ..layers import INITS, SPARSE_INITS
from ..optim.adamw import ADAM_DEFAULTS, OPTION_DEFAULTS, validate_group
from ..optim.muon import MUON_DEFAULTS, validate_muon_group
from ..restarts import DEFAULT_EVENT, DEFAULT_MIN_LR_RATIO, DEFAULT_RESET, EVENTS, RESETS
from ..wrap import LowRankConfig

__all__ = [
    "Method",
    "LowRankSection",
    "OptimizerSection",
    "RestartsSection",
    "ScheduleSection",
    "TrainingSection",
    "OSPSection",
    "QuantSection",
    "QUANT_FORMATS",
    "OPTIMIZERS",
    "GROUP_OPTIONS",
]

OPTIMIZERS = ("projected_adamw", "adamw", "muon")
"""``projected_adamw``: :class:`lowrank.optim.ProjectedAdamW`; ``adamw``: ``torch.optim.AdamW``;
``muon``: :class:`lowrank.optim.Muon` on the ``matrix`` group, ProjectedAdamW on ``other``."""

GROUP_OPTIONS = frozenset(OPTION_DEFAULTS) | {"lr", "betas", "eps", "weight_decay"}
"""Keys a ProjectedAdamW group may set: every ProjectedAdamW group option."""

MUON_GROUP_OPTIONS = frozenset(MUON_DEFAULTS) | {"lr", "weight_decay", "state_dtype"}
"""Keys the ``matrix`` group of a ``muon`` optimizer may set: Muon's options."""


# ---------------------------------------------------------------------- value checks


class _Check:
    """Validators: each returns the (normalised) value or raises ``UsageError('<where>: <key> ...')``."""

    @staticmethod
    def fail(where: str, key: str, expected: str, value: Any) -> UsageError:
        return UsageError(f"{where}: {key} must be {expected}, got {value!r}")

    @classmethod
    def integer(cls, minimum: int = 0, maximum: int | None = None) -> Callable:
        expected = f"an integer >= {minimum}" + (f" and < {maximum}" if maximum is not None else "")

        def check(value, where, key):
            if isinstance(value, float) and value.is_integer():
                value = int(value)  # 200.0 from a --set or a JSON round trip
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (maximum is not None and value >= maximum):
                raise cls.fail(where, key, expected, value)
            return value

        return check

    @classmethod
    def number(cls, low: float = 0.0, high: float = math.inf, *, low_open: bool = False, high_open: bool = True) -> Callable:
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        expected = f"a finite number in {left}{low:g}, {high:g}{right}"

        def check(value, where, key):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if ok:
                ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
            if not ok:
                raise cls.fail(where, key, expected, value)
            return float(value)

        return check

    @classmethod
    def flag(cls) -> Callable:
        def check(value, where, key):
            if not isinstance(value, bool):
                raise cls.fail(where, key, "true or false", value)
            return value

        return check

    @classmethod
    def choice(cls, options) -> Callable:
        def check(value, where, key):
            if value not in options:
                raise cls.fail(where, key, "one of " + ", ".join(map(str, options)), value)
            return value

        return check

    @classmethod
    def patterns(cls) -> Callable:
        """PEFT's target forms: a name/regex string or a list of names."""

        def check(value, where, key):
            if isinstance(value, str) and value:
                return value
            if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) and v for v in value):
                return list(value)
            raise cls.fail(where, key, "a module name pattern (a string) or a list of module names", value)

        return check

    @classmethod
    def pair(cls) -> Callable:
        def check(value, where, key):
            ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v < 1.0 for v in value)
            if not ok:
                raise cls.fail(where, key, "two numbers in [0, 1), e.g. [0.9, 0.999]", value)
            return tuple(float(v) for v in value)

        return check

    @staticmethod
    def optional(check: Callable) -> Callable:
        def wrapped(value, where, key):
            return None if value is None else check(value, where, key)

        return wrapped


def _unknown(key: str, known, where: str) -> UsageError:
    close = difflib.get_close_matches(key, sorted(known), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(sorted(known))}"
    return UsageError(f"{where}: unknown key {key!r}{hint}")


class SectionView(Mapping):
    """A frozen dataclass section, also readable as a mapping of its fields."""

    CHECKS: dict[str, Callable] = {}
    NAME = ""

    def __getitem__(self, key: str) -> Any:
        if key not in self._names():
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self):
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    @classmethod
    def _names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def parse(cls, data: Any, where: str):
        """Build the section from a mapping, checking every key and value."""
        if not isinstance(data, Mapping):
            raise UsageError(f"{where}: section {cls.NAME!r} must be a mapping of keys, got {data!r}")
        known = set(cls._names())
        values = {}
        for key, value in data.items():
            if key not in known:
                raise _unknown(str(key), known, f"{where}: {cls.NAME}")
            check = cls.CHECKS.get(key)
            values[key] = check(value, where, f"{cls.NAME}.{key}") if check else value
        required = [f.name for f in fields(cls) if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [key for key in required if key not in values]
        if missing:
            raise UsageError(f"{where}: section {cls.NAME!r} needs {', '.join(missing)}")
        try:
            section = cls(**values)
        except ValueError as error:
            raise UsageError(f"{where}: {cls.NAME}: {error}") from None
        section.check(where)
        return section

    def check(self, where: str) -> None:
        """Checks across keys of the section (none by default)."""

    def to_dict(self) -> dict[str, Any]:
        return {name: _plain(getattr(self, name)) for name in self._names()}


def _plain(value: Any) -> Any:
    """JSON/YAML-ready: tuples become lists, dtypes their names, mappings plain dicts."""
    if isinstance(value, torch.dtype):
        return dtype_name(value)
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ---------------------------------------------------------------------- the sections


@dataclass
class LowRankSection(LowRankConfig, SectionView):
    """:class:`~lowrank.wrap.LowRankConfig` (its fields and defaults) plus:

    * ``seed``: ``None`` (default) means the run's seed;
    * ``warm_start_steps``: train the dense model for this many steps first and factorize it
      then (ReLoRA's full-rank warm start; 0 = off).
    """

    seed: int | None = None
    warm_start_steps: int = 0

    NAME = "lowrank"
    CHECKS = {
        "rank": _Check.optional(_Check.integer(1)),
        "rank_ratio": _Check.optional(_Check.number(0.0, 1.0, low_open=True, high_open=False)),
        "alpha": _Check.optional(_Check.number(0.0, low_open=True)),
        "target_modules": _Check.patterns(),
        "exclude_modules": _Check.optional(_Check.patterns()),
        "keep_base": _Check.flag(),
        "sparse_density": _Check.number(0.0, 1.0),
        "init": _Check.optional(_Check.choice(INITS)),
        "sparse_init": _Check.optional(_Check.choice(SPARSE_INITS)),
        "seed": _Check.optional(_Check.integer(0, 2**63)),
        "warm_start_steps": _Check.integer(0),
    }

    def config(self, seed: int) -> LowRankConfig:
        """The :class:`~lowrank.wrap.LowRankConfig` to wrap with (``seed``: the run's)."""
        values = {f.name: getattr(self, f.name) for f in fields(LowRankConfig)}
        values["seed"] = self.seed if self.seed is not None else seed
        return LowRankConfig(**values)


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


@dataclass(frozen=True)
class RestartsSection(SectionView):
    """The restart clock (:class:`~lowrank.restarts.RestartController`): every ``cycle_length``
    steps a layer ``event`` and a momentum ``reset``, then an LR re-warm-up of ``rewarmup_steps``."""

    cycle_length: int
    event: str = DEFAULT_EVENT
    reset: str = DEFAULT_RESET
    rewarmup_steps: int = 0

    NAME = "restarts"
    CHECKS = {
        "cycle_length": _Check.integer(1),
        "event": _Check.choice(EVENTS),
        "reset": _Check.choice(RESETS),
        "rewarmup_steps": _Check.integer(0),
    }

    def check(self, where: str) -> None:
        if self.rewarmup_steps >= self.cycle_length:
            raise UsageError(f"{where}: restarts.rewarmup_steps ({self.rewarmup_steps}) must be shorter than "
                             f"restarts.cycle_length ({self.cycle_length})")


def _warmup(value: Any, where: str, key: str) -> float | int:
    number = _Check.number(0.0)(value, where, key)
    if number >= 1 and not number.is_integer():
        raise _Check.fail(where, key, "a fraction of the run (< 1) or a whole number of steps", value)
    return number if number < 1 else int(number)


@dataclass(frozen=True)
class ScheduleSection(SectionView):
    """Linear warm-up (``warmup``: a fraction of the run if < 1, else steps), then cosine decay
    to ``min_lr_ratio`` of the peak."""

    warmup: float = 0.1
    min_lr_ratio: float = DEFAULT_MIN_LR_RATIO

    NAME = "schedule"
    CHECKS = {"warmup": _warmup, "min_lr_ratio": _Check.number(0.0, 1.0, high_open=False)}

    def warmup_steps(self, total_steps: int) -> int:
        steps = int(round(self.warmup * total_steps)) if self.warmup < 1 else int(self.warmup)
        if steps >= total_steps:
            raise UsageError(f"schedule.warmup is {steps} steps but the run has only {total_steps}; "
                             "lower schedule.warmup or train longer")
        return steps


NONFINITE_POLICIES = ("skip", "stop")


@dataclass(frozen=True)
class TrainingSection(SectionView):
    """The step itself (:mod:`lowrank.run.health` says why these exist):

    * ``grad_clip``: clip the global gradient norm to this (``null`` or 0: no clipping).
    * ``nonfinite_grads``: a step whose gradient norm is NaN or infinite is skipped (``skip``:
      no update, the run goes on) or ends the run (``stop``).
    * ``max_skipped_steps``: stop after this many skipped steps in a row.
    * ``dead_steps``: stop after this many steps in a row with an exactly zero gradient (0: never).
    """

    grad_clip: float | None = 1.0
    nonfinite_grads: str = "skip"
    max_skipped_steps: int = 10
    dead_steps: int = 20

    NAME = "training"
    CHECKS = {
        "grad_clip": _Check.optional(_Check.number(0.0)),
        "nonfinite_grads": _Check.choice(NONFINITE_POLICIES),
        "max_skipped_steps": _Check.integer(1),
        "dead_steps": _Check.integer(0),
    }


@dataclass(frozen=True)
class OSPSection(SectionView):
    """Outlier-Safe Pre-Training's architecture changes (Park et al. 2025, :mod:`lowrank.osp`):
    ``single_scale_norm`` (one learnable gain per RMSNorm) and ``embedding_projection``
    (orthogonally initialised ``d×d`` projections after the embedding and before the head)."""

    single_scale_norm: bool = True
    embedding_projection: bool = True

    NAME = "osp"
    CHECKS = {"single_scale_norm": _Check.flag(), "embedding_projection": _Check.flag()}

    def check(self, where: str) -> None:
        if not (self.single_scale_norm or self.embedding_projection):
            raise UsageError(f"{where}: osp: nothing enabled; drop the section or enable single_scale_norm / embedding_projection")


QUANT_FORMATS = ("int8", "int4", "fp4", "fp4_e1m2", "fp4_e2m1")
"""``fp4`` is ``fp4_e1m2``, the FP4 of Stable-SPAM's scripts; ``fp4_e2m1`` is the OCP MX FP4."""


@dataclass(frozen=True)
class QuantSection(SectionView):
    """Fake-quantized training (straight-through estimator; :mod:`lowrank.quant.fake`), as
    Stable-SPAM's 4-bit scripts simulate it. Defaults: INT4 weights, asymmetric min–max per group
    of 256; INT4 activations per group of 64 with stochastic rounding, the 2 largest-magnitude
    entries of each group kept in full precision; on q/k/v/o/gate/up/down.

    * ``weights`` / ``activations``: one of :data:`QUANT_FORMATS`, or ``null`` (full precision).
    * ``group_size``: weight group size; ``activation_group_size``: activation group size; groups
      are consecutive entries of the flattened tensor (Stable-SPAM's ``reshape(-1, g)``).
    * ``stochastic_rounding``: for activations (weights round to nearest).
    * ``keep_outliers``: full-precision entries per activation group.
    * ``target_modules``: PEFT's rules.
    """

    weights: str | None = "int4"
    activations: str | None = "int4"
    group_size: int = 256
    activation_group_size: int = 64
    stochastic_rounding: bool = True
    keep_outliers: int = 2
    target_modules: str | list[str] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    NAME = "quant"
    CHECKS = {
        "weights": _Check.optional(_Check.choice(QUANT_FORMATS)),
        "activations": _Check.optional(_Check.choice(QUANT_FORMATS)),
        "group_size": _Check.integer(1),
        "activation_group_size": _Check.integer(1),
        "stochastic_rounding": _Check.flag(),
        "keep_outliers": _Check.integer(0),
        "target_modules": _Check.patterns(),
    }

    def check(self, where: str) -> None:
        if self.weights is None and self.activations is None:
            raise UsageError(f"{where}: quant: weights and activations are both null; drop the section instead")
        try:
            self.config(0)
        except ValueError as error:
            raise UsageError(f"{where}: quant: {error}") from None

    def formats(self):
        """``(weight format, activation format)`` as :class:`lowrank.quant.QuantFormat` (or ``None``)."""
        from ..quant import QuantFormat

        def make(name, group, activation):
            if name is None:
                return None
            kind, bits = ("int", int(name[3:])) if name.startswith("int") else ("fp4_e2m1" if name == "fp4_e2m1" else "fp4_e1m2", 4)
            # Groups of the flattened tensor, as Stable-SPAM's scripts (x.reshape(-1, g)).
            return QuantFormat(kind=kind, bits=bits, group_size=group, symmetric=activation or kind != "int",
                               stochastic=activation and self.stochastic_rounding,
                               keep_outliers=self.keep_outliers if activation else 0, flat=True)

        return (make(self.weights, self.group_size, False), make(self.activations, self.activation_group_size, True))

    def config(self, seed: int):
        """The :class:`lowrank.quant.FakeQuantConfig` to apply (``seed``: the run's)."""
        from ..quant import FakeQuantConfig

        weights, activations = self.formats()
        targets = self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
        return FakeQuantConfig(weights=weights, activations=activations, target_modules=targets, seed=seed)


_SECTIONS = {"lowrank": LowRankSection, "optimizer": OptimizerSection, "restarts": RestartsSection,
             "schedule": ScheduleSection, "training": TrainingSection, "osp": OSPSection, "quant": QuantSection}
_TOP_LEVEL = {"description", *_SECTIONS}


# ---------------------------------------------------------------------- the method


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
