"""Training methods as presets: one YAML file per recipe (``configs/methods/``), parsed into a
typed :class:`Method` (:mod:`.sections`: every key's type, range and default), and turned into a
wrapped model, an optimizer and a restart controller (:mod:`.build`) by the same code for the
trainer, the memory estimator, the benchmarks and the Trainer integration."""

from .build import apply_method, build_controller, build_optimizer, check_projection_rank, param_groups
from .presets import available_methods, load_method, method_overrides
from .sections import (
    GROUP_OPTIONS,
    OPTIMIZERS,
    LowRankSection,
    Method,
    OptimizerSection,
    RestartsSection,
    ScheduleSection,
    TrainingSection,
)

__all__ = [
    "Method",
    "LowRankSection",
    "OptimizerSection",
    "RestartsSection",
    "ScheduleSection",
    "TrainingSection",
    "OPTIMIZERS",
    "GROUP_OPTIONS",
    "available_methods",
    "load_method",
    "method_overrides",
    "apply_method",
    "param_groups",
    "build_optimizer",
    "build_controller",
    "check_projection_rank",
]
