"""The ``restarts`` section: the restart clock (absent: no restarts)."""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import UsageError
from ...optim.reset import DEFAULT_RESET_MOMENTS, RESET_MOMENTS
from ...restarts import DEFAULT_EVENT, DEFAULT_RESET, EVENTS, RESETS
from .base import SectionView, _Check


@dataclass(frozen=True)
class RestartsSection(SectionView):
    """The restart clock (:class:`~lowrank.restarts.RestartController`): every ``cycle_length``
    steps a layer ``event`` and a momentum ``reset`` (of ``reset_moments``: both of Adam's moments, or
    only the first, :data:`lowrank.optim.reset.RESET_MOMENTS`), then an LR re-warm-up of ``rewarmup_steps``.
    ``rotate_moments``: carry the moments the reset keeps into the refactorized coordinates
    (:mod:`lowrank.optim.rotation`) instead of leaving them in the old ones."""

    cycle_length: int
    event: str = DEFAULT_EVENT
    reset: str = DEFAULT_RESET
    reset_moments: str = DEFAULT_RESET_MOMENTS
    rotate_moments: bool = False
    rewarmup_steps: int = 0

    NAME = "restarts"
    CHECKS = {
        "cycle_length": _Check.integer(1),
        "event": _Check.choice(EVENTS),
        "reset": _Check.choice(RESETS),
        "reset_moments": _Check.choice(RESET_MOMENTS),
        "rotate_moments": _Check.flag(),
        "rewarmup_steps": _Check.integer(0),
    }

    def check(self, where: str) -> None:
        if self.rewarmup_steps >= self.cycle_length:
            raise UsageError(f"{where}: restarts.rewarmup_steps ({self.rewarmup_steps}) must be shorter than "
                             f"restarts.cycle_length ({self.cycle_length})")
