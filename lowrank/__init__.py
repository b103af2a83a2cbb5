"""lowrank: memory-efficient pretraining of large language models.

Low-rank factorized layers with balanced refactorization and high-rank merging
(:mod:`lowrank.layers`, :mod:`lowrank.wrap`), and a projected-gradient Adam with momentum reset,
sparse momentum and spike-aware clipping (:mod:`lowrank.optim`).
"""

from .layers import LowRankLinear
from .wrap import (
    LowRankConfig,
    ParameterCount,
    count_parameters,
    is_wrapped,
    lowrank_layers,
    merge,
    merge_to_dense,
    refactorize,
    wrap,
)

__version__ = "0.1.0"

__all__ = [
    "LowRankConfig",
    "LowRankLinear",
    "ParameterCount",
    "count_parameters",
    "is_wrapped",
    "lowrank_layers",
    "merge",
    "merge_to_dense",
    "refactorize",
    "wrap",
]
