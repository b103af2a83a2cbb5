"""The process group, device and CPU threads of one rank, and the DDP wrapper.

``torchrun`` sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; without them the run is one
process. The backend is NCCL on CUDA and gloo on the CPU.

A rank that stalls or dies must not hang the others for PyTorch's default 30 minutes: the
process group is created with ``timeout`` (``--dist-timeout``), every rank records the step it
reached in the process group's store (:class:`Heartbeat`), and a collective that times out is
reported as one line naming the rank(s) that stopped answering (:func:`stalled_message`).
"""

from __future__ import annotations

import datetime
import gc
import hashlib
import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..errors import UsageError, first_line
from ..wrap import unwrap_model

__all__ = ["DistInfo", "init_distributed", "launched_by_torchrun", "wrap_ddp", "parameter_hash", "Heartbeat", "is_comm_failure", "stalled_message"]


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


def launched_by_torchrun() -> bool:
    """Whether this process was started by ``torchrun`` (it sets RANK and MASTER_ADDR)."""
    return "RANK" in os.environ and "MASTER_ADDR" in os.environ


def init_distributed(device_choice: str, timeout: float = 600.0, *, always_group: bool = False) -> tuple[DistInfo, torch.device]:
    """Join the process group (under ``torchrun``) and pick this rank's device.

    ``device_choice``: ``auto`` (CUDA when visible), ``cuda`` or ``cpu``. ``timeout``: seconds
    any collective may wait for the other ranks before the run is ended with a message.
    ``always_group``: join even a one-process group under ``torchrun`` (FSDP2 needs a device
    mesh, also on one rank).
    """
    try:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        info = DistInfo(int(os.environ.get("RANK", "0")), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    except ValueError:
        raise UsageError("WORLD_SIZE, RANK and LOCAL_RANK must be integers (torchrun sets them); start with torchrun") from None
    want_cuda = device_choice == "cuda" or (device_choice == "auto" and torch.cuda.is_available())
    if device_choice == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is visible; use --device cpu")
    if (world_size > 1 or (always_group and launched_by_torchrun())) and not dist.is_initialized():
        if not (os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT")):
            raise UsageError(f"WORLD_SIZE={world_size} but MASTER_ADDR / MASTER_PORT are not set: start the ranks with "
                             f"torchrun --nproc_per_node {world_size} -m lowrank pretrain ...")
        try:
            dist.init_process_group(backend="nccl" if want_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout))
        except Exception as error:  # noqa: BLE001 - any failure to join is the same user-facing problem
            raise UsageError(f"rank {info.rank} could not join the process group of {world_size} ranks within {timeout:g} s "
                             f"({first_line(error)}); start every rank with torchrun") from None
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
    """``model`` inside PyTorch's DDP when there are several ranks, else ``model`` itself.

    Drop the wrapper before ``destroy_process_group`` (its reducer holds the group; see
    :meth:`lowrank.run.loop.Trainer.release_wrapper`)."""
    if not info.enabled:
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def end_process_group(completed: bool) -> None:
    """Destroy the default process group, in the order that ends every rank cleanly.

    First collect garbage: DDP reducers and FSDP2 modules sit in reference cycles that hold the
    group; freed after ``destroy_process_group`` they hold its last reference, and gloo's
    destructor then joins worker threads that may wait for the GIL (a hang), or finds them
    joinable at exit (``terminate called without an active exception``, SIGABRT). Then, after a
    completed run, a barrier: no rank shuts gloo down while a peer may still be sending
    (pytorch/gloo#155). After a failure the peers may be gone and a barrier would only wait for
    them, so there is none. Does nothing when no group exists.
    """
    if not dist.is_initialized():
        return
    gc.collect()
    if completed:
        dist.barrier()
    dist.destroy_process_group()


def parameter_hash(model: nn.Module) -> str:
    """sha256 of every parameter's bytes, in ``named_parameters`` order: equal hashes mean
    bit-identical weights (how rank consistency is checked at the end of a run). A sharded
    (FSDP2 / DTensor) parameter is hashed whole: every rank gathers it, so the hash is the model's."""
    digest = hashlib.sha256()
    for name, param in unwrap_model(model).named_parameters():
        full = param.full_tensor() if hasattr(param, "full_tensor") else param
        digest.update(name.encode())
        digest.update(full.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


_COMM_FAILURE = re.compile(r"timed? ?out|timeout|connection (reset|closed|refused)|closed by peer|broken pipe|"
                           r"peer .*(died|exited)|ProcessGroup.*(abort|error)", re.I)


def is_comm_failure(error: BaseException) -> bool:
    """Whether ``error`` is a collective that gave up on another rank (a timeout, a lost peer)."""
    return isinstance(error, RuntimeError) and bool(_COMM_FAILURE.search(str(error)))


class Heartbeat:
    """Each rank writes the step it has reached into the process group's store, so that when a
    collective times out the survivors can say which rank stopped where. One small store write
    per step (a TCP round trip to rank 0's store)."""

    def __init__(self, info: DistInfo) -> None:
        self.info = info
        self.store = dist.distributed_c10d._get_default_store() if info.enabled and dist.is_initialized() else None

    def beat(self, step: int) -> None:
        if self.store is not None:
            self.store.set(f"lowrank/heartbeat/{self.info.rank}", str(step))

    def positions(self) -> dict[int, int | None]:
        """The last step each rank reported (``None``: never reported)."""
        positions: dict[int, int | None] = {}
        for rank in range(self.info.world_size):
            key = f"lowrank/heartbeat/{rank}"
            try:
                positions[rank] = int(self.store.get(key)) if self.store is not None and self.store.check([key]) else None
            except Exception:  # noqa: BLE001 - the store itself may be gone with rank 0
                positions[rank] = None
        return positions


def stalled_message(heartbeat: Heartbeat, timeout: float, error: BaseException) -> str:
    """One line: which ranks stopped answering, at which step, and what to do."""
    positions = heartbeat.positions()
    known = [p for p in positions.values() if p is not None]
    ahead = max(known) if known else None
    behind = [f"rank {r} (at step {p})" if p is not None else f"rank {r}" for r, p in positions.items()
              if p is None or (ahead is not None and p < ahead)]
    if not behind:
        # Every rank reached the same step: the one that stopped did so after its heartbeat (inside
        # the step). It is not this one, so it is one of the others, which the heartbeat knows.
        others = [r for r in positions if r != heartbeat.info.rank]
        where = f" (at step {ahead})" if ahead is not None else ""
        behind = [f"rank {others[0]}{where}" if len(others) == 1 else f"one of ranks {', '.join(map(str, others))}{where}"]
    who = ", ".join(behind)
    return (f"rank {heartbeat.info.rank}: {who} stopped answering; no collective completed within --dist-timeout "
            f"{timeout:g} s ({first_line(error)}). Check that rank's log; resume from the last checkpoint with --resume latest")
