"""A pretraining run: its configuration (:mod:`.config`), its folder and metadata
(:mod:`.folder`), atomic checkpoints (:mod:`.checkpoint`), metrics (:mod:`.metrics`) and the
training loop (:mod:`.loop`)."""

from .config import TrainConfig
from .folder import CheckpointMeta, ResumePoint, RunFolder
from .loop import Phase, Trainer, plan_phases, pretrain

__all__ = ["TrainConfig", "Trainer", "Phase", "plan_phases", "pretrain", "RunFolder", "CheckpointMeta", "ResumePoint"]
