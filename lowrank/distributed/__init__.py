"""Running on several processes: the process group and device of each rank (:mod:`.setup`).

DDP is PyTorch's own (``torch.nn.parallel.DistributedDataParallel``); the training loop wraps the
model with it when ``WORLD_SIZE > 1`` (``torchrun``).
"""

from .setup import DistInfo, init_distributed, parameter_hash, wrap_ddp

__all__ = ["DistInfo", "init_distributed", "parameter_hash", "wrap_ddp"]
