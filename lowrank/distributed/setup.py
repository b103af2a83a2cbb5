"""The process group, device and CPU threads of one rank, and the DDP wrapper.

``torchrun`` sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; without them the run is one
process. The backend is NCCL on CUDA and gloo on the CPU.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..errors import UsageError
from ..wrap import unwrap_model

__all__ = ["DistInfo", "init_distributed", "wrap_ddp", "parameter_hash"]


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its rank, the number of ranks, its rank on this node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_choice: str) -> tuple[DistInfo, torch.device]:
    """Join the process group (under ``torchrun``) and pick this rank's device.

    ``device_choice``: ``auto`` (CUDA when visible), ``cuda`` or ``cpu``.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    info = DistInfo(int(os.environ.get("RANK", "0")), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    want_cuda = device_choice == "cuda" or (device_choice == "auto" and torch.cuda.is_available())
    if device_choice == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is visible; use --device cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if want_cuda else "gloo")
    if want_cuda:
        torch.cuda.set_device(info.local_rank)
        return info, torch.device("cuda", info.local_rank)
    # Several ranks on one CPU each spinning all cores' OpenMP threads is catastrophically
    # slow (observed 100x on LAPACK calls); give each rank its share of the cores.
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if local_world > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return info, torch.device("cpu")


def wrap_ddp(model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """``model`` inside PyTorch's DDP when there are several ranks, else ``model`` itself."""
    if not info.enabled:
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def parameter_hash(model: nn.Module) -> str:
    """sha256 of every parameter's bytes, in ``named_parameters`` order: equal hashes mean
    bit-identical weights (how DDP rank consistency is checked at the end of a run)."""
    digest = hashlib.sha256()
    for name, param in unwrap_model(model).named_parameters():
        digest.update(name.encode())
        digest.update(param.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
