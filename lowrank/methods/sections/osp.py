"""The ``osp`` section: Outlier-Safe Pre-Training's architecture changes (absent: none)."""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import UsageError
from .base import SectionView, _Check


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
