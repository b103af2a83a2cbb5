"""The ``lowrank`` section: how the model is factorized (absent: a dense model)."""

from __future__ import annotations

from dataclasses import dataclass, fields

from ...layers import INITS, SPARSE_INITS
from ...wrap import LowRankConfig
from .base import SectionView, _Check


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
