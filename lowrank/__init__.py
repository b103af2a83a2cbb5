"""lowrank: memory-efficient pretraining of large language models.

Low-rank factorized layers with balanced refactorization and high-rank merging
(:mod:`lowrank.layers`, :mod:`lowrank.wrap`), a projected-gradient Adam with momentum reset,
sparse momentum and spike-aware clipping (:mod:`lowrank.optim`), one controller that keeps layer
events, momentum resets and learning-rate restarts on the same clock (:mod:`lowrank.restarts`),
a memory profiler (:mod:`lowrank.memory`) and a pretraining CLI (``lowrank pretrain``).
"""

from .layers import LowRankLinear
from .restarts import RestartController
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
    "RestartController",
    "count_parameters",
    "is_wrapped",
    "lowrank_layers",
    "merge",
    "merge_to_dense",
    "refactorize",
    "wrap",
]
