"""Memory of training a model with a method: estimated before training, measured while training.

* :func:`estimate` — analytic, on the ``meta`` device (allocates nothing): weights, gradients,
  optimizer state (the real wrapping and the optimizers' state rules) and activations (the
  stated LLaMA-block formula in :mod:`lowrank.memory.activations`).
* :func:`measure` — run real steps and count tensors (parameters, gradients, optimizer state,
  saved activations) and the peak (CUDA's max allocated, or the torch profiler's and the
  process's peak on CPU).
* :mod:`lowrank.memory.report` — terminal table, JSON and stacked-bar PNG; ``lowrank memory`` is
  the command line (:mod:`lowrank.memory.cli`).
"""

from .activations import ActivationBytes, llama_activation_bytes
from .build import available
from .estimate import MemoryEstimate, estimate
from .measure import Measurement, measure, measure_method

__all__ = [
    "ActivationBytes",
    "MemoryEstimate",
    "Measurement",
    "available",
    "estimate",
    "llama_activation_bytes",
    "measure",
    "measure_method",
]
