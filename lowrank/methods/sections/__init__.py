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

One module per section (``lowrank``, ``optimizer``, ``restarts``, ``schedule``, ``training``,
``osp``, ``quant``), the shared checks in ``base`` and the whole preset in ``method``.
"""

from __future__ import annotations

# Every name the single module exported, also those outside __all__ (SectionView, set_dotted, ...).
from .base import SectionView  # noqa: F401
from .lowrank import LowRankSection
from .method import Method, set_dotted  # noqa: F401
from .optimizer import GROUP_OPTIONS, MUON_GROUP_OPTIONS, OPTIMIZERS, OptimizerSection  # noqa: F401
from .osp import OSPSection
from .quant import QUANT_FORMATS, QuantSection
from .restarts import RestartsSection
from .schedule import ScheduleSection
from .training import NONFINITE_POLICIES, TrainingSection  # noqa: F401

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
