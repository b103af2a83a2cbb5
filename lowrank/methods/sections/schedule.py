"""The ``schedule`` section: linear warm-up and the cosine floor."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...errors import UsageError
from ...restarts import DEFAULT_MIN_LR_RATIO
from .base import SectionView, _Check


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
