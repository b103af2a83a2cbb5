"""Exact byte counts of what training holds: parameters, gradients, optimizer state, peak memory.

These count real tensors, so they work for any optimizer (ours, torch's, bitsandbytes', GaLore's)
and are the ground truth the analytic estimator in :mod:`lowrank.memory` is tested against.
"""

from __future__ import annotations

import contextlib
import os
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
    "optimizer_extra_bytes",
    "live_bytes",
    "profiled_allocation_rises",
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


def optimizer_extra_bytes(optimizer: torch.optim.Optimizer) -> int:
    """What an optimizer keeps outside its state: ProjectedAdamW's (and Muon's AdamW half's)
    sparse-momentum index cache; 0 for optimizers without one."""
    state_bytes = getattr(optimizer, "state_bytes", None)
    return state_bytes().subset_cache if callable(state_bytes) else 0


def live_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes training holds between steps: parameters, buffers, gradients, the optimizer's state
    and what it keeps outside it (:func:`optimizer_extra_bytes`)."""
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    return parameter_bytes(model) + buffer_bytes(model) + grads + optimizer_state_bytes(optimizer) + optimizer_extra_bytes(optimizer)


def profiled_allocation_rises(step_fn) -> tuple[Any, tuple[int, int] | None]:
    """Run ``step_fn`` under the torch profiler with memory events and return ``(its result,
    (largest rise of CPU allocations inside optimizer steps, largest rise elsewhere))`` — the CPU
    analogue of CUDA's ``max_memory_allocated`` once added to the bytes live before the step
    (:func:`live_bytes`); ``None`` when the profiler gave no allocation events.

    Reads the raw allocation (+) and free (-) events of the CPU allocator in time order (the
    aggregated FunctionEvents attribute allocations to ops, which loses the order a peak needs);
    ``torch.optim.Optimizer.step`` annotates itself as ``Optimizer.step#<class>.step`` (our bf16
    and in-backward steps name themselves alike), which splits the peak between the optimizer's
    updates and the rest. A tensor allocated before the profiler started and freed while it runs
    is not reliably reported (the profiler pairs a free with an allocation it saw): free what the
    previous step left (its gradients) before calling this.
    """
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
    with _native_stderr_silenced():  # Kineto prints "profiler_start" / "profiler_stop" lines into a training run's log
        prof.start()
    try:
        result = step_fn()
    finally:
        with _native_stderr_silenced():
            prof.stop()
    try:
        events = list(prof.profiler.kineto_results.events())
    except AttributeError:
        return result, None
    memory = sorted((e for e in events if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU),
                    key=lambda e: e.start_ns())
    if not memory:
        return result, None
    steps = [(e.start_ns(), e.start_ns() + e.duration_ns()) for e in events if e.name().startswith("Optimizer.step#")]
    live = in_step = elsewhere = 0
    for event in memory:
        live += event.nbytes()
        if any(start <= event.start_ns() <= end for start, end in steps):
            in_step = max(in_step, live)
        else:
            elsewhere = max(elsewhere, live)
    return result, (in_step, elsewhere)


@contextlib.contextmanager
def _native_stderr_silenced():
    """File descriptor 2 pointed at ``/dev/null`` (C++ libraries write there, not to ``sys.stderr``)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
