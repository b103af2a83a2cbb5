"""The ``restarts`` section: the restart clock (absent: no restarts)."""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import UsageError
from ...restarts import DEFAULT_EVENT, DEFAULT_RESET, EVENTS, RESETS
from .base import SectionView, _Check


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
