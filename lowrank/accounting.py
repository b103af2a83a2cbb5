"""Exact byte counts of what training holds: parameters, gradients, optimizer state, peak memory.

These count real tensors, so they work for any optimizer (ours, torch's, bitsandbytes', GaLore's)
and are the ground truth the analytic estimator in :mod:`lowrank.memory` is tested against.
"""

from __future__ import annotations

import resource
import sys
from typing import Any

import torch
from torch import nn

__all__ = [
    "tensor_bytes",
    "parameter_bytes",
    "gradient_bytes",
    "buffer_bytes",
    "optimizer_state_bytes",
    "peak_memory_bytes",
    "reset_peak_memory",
]


def tensor_bytes(obj: Any, _seen: set[int] | None = None) -> int:
    """Bytes of every distinct tensor inside ``obj`` (nested dicts, lists, tuples, objects with
    tensor attributes such as peer optimizers' projector objects), each storage counted once."""
    seen = set() if _seen is None else _seen
    if isinstance(obj, torch.Tensor):
        obj = _local(obj)
        if obj.device.type == "meta":
            return obj.numel() * obj.element_size()
        key = obj.untyped_storage().data_ptr() if obj.numel() else id(obj)
        if key in seen:
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes() if obj.numel() else 0
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple, set)):
        return sum(tensor_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, (type, nn.Module)):
        return sum(tensor_bytes(v, seen) for v in vars(obj).values())
    return 0


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded (DTensor) tensor; any other tensor as it is. Byte counts are
    per process: under FSDP2 a rank holds its shards."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def parameter_bytes(model: nn.Module, *, trainable_only: bool = False) -> int:
    # model.parameters() yields a tied or shared parameter once.
    return sum(_local(p).numel() * p.element_size() for p in model.parameters() if p.requires_grad or not trainable_only)


def gradient_bytes(model: nn.Module) -> int:
    """Bytes of the gradients training keeps: one per trainable parameter, in its dtype
    (what exists after ``backward``; counts the allocated ``.grad`` tensors when present)."""
    total = 0
    for p in model.parameters():
        if p.grad is not None:
            total += _local(p.grad).numel() * p.grad.element_size()
        elif p.requires_grad:
            total += _local(p).numel() * p.element_size()
    return total


def buffer_bytes(model: nn.Module) -> int:
    """Bytes of buffers (e.g. SLTrain's sparse indices, rotary caches)."""
    return sum(b.numel() * b.element_size() for b in model.buffers())


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of all tensors in ``optimizer.state`` (moments, projectors, quantization scales...)."""
    return tensor_bytes(dict(optimizer.state))


def reset_peak_memory(device: torch.device | str | None = None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device | str | None = None) -> int:
    """CUDA's peak allocated bytes on a GPU; the process's peak resident set size on CPU
    (``ru_maxrss``: everything the process touched, Python and libraries included)."""
    if device is not None and torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)
