"""Training methods as presets: one YAML file per recipe (``configs/methods/``), parsed into a
typed :class:`Method` (:mod:`.sections`: every key's type, range and default), and turned into a
wrapped model, an optimizer and a restart controller (:mod:`.build`; the model built directly in
its storage dtype by :mod:`.model`) by the same code for the trainer, the memory estimator, the
benchmarks and the Trainer integration."""

from . import build, model, presets, sections
from .build import *  # noqa: F401,F403
from .model import *  # noqa: F401,F403
from .presets import *  # noqa: F401,F403
from .sections import *  # noqa: F401,F403

__all__ = [*sections.__all__, *presets.__all__, *build.__all__, *model.__all__]
