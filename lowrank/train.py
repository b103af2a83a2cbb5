"""``lowrank pretrain`` from Python: the names of earlier versions, kept here.

The loop lives in :mod:`lowrank.run` (``Trainer``, ``pretrain``, ``TrainConfig``), the command
line in :mod:`lowrank.cli.pretrain`, the DDP helpers in :mod:`lowrank.distributed`.
"""

from .cli.pretrain import add_arguments, format_summary, run_from_args
from .distributed import parameter_hash
from .run import TrainConfig, Trainer, pretrain

__all__ = ["TrainConfig", "Trainer", "pretrain", "add_arguments", "run_from_args", "format_summary", "parameter_hash"]
