"""Measured memory of real training steps: exact tensor bytes and the peak.

Parameters, gradients and optimizer state are counted tensor by tensor with
:mod:`lowrank.accounting` (exact). Activations are the tensors autograd saves for backward in the
last step (exact on any device, caught with ``torch.autograd.graph.saved_tensors_hooks``). With
activation checkpointing these are what stays saved from forward to backward: each layer's input
(``torch.utils.checkpoint`` saves it through the same hooks) and what lies outside the layers; the
one layer recomputed at a time in backward saves through the checkpoint's own hooks and is not in
the count (the estimate's ``per_layer``).
The peak is ``torch.cuda.max_memory_allocated`` on a GPU; on the CPU it is the bytes live at the
start of the last step plus the largest rise of the torch profiler's allocation events during
it (the CPU analogue of CUDA's counter), and the process's peak resident set size (everything the
process ever touched: Python, libraries, earlier work) is reported next to it.

With the optimizer step inside backward (``layerwise``, ``lowrank pretrain --layerwise-step``,
:mod:`lowrank.run.layerwise`) each gradient is freed once its parameter has stepped, so no set of
gradients is left after the step to count: ``gradients`` is then the most ``.grad`` bytes alive at
once during the last step, seen by :class:`LiveGradients` (post-accumulate-grad hooks that run
before the step's own, when a gradient is complete and not yet freed). The CPU peak's split then
means: ``peak_optimizer_step``, the peak during the per-parameter updates inside backward (each
annotated as an optimizer step); ``peak_forward_backward``, the peak anywhere else in the step.
"""

from __future__ import annotations

import gc
import itertools
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from ..accounting import (buffer_bytes, gradient_bytes, live_bytes, optimizer_extra_bytes, optimizer_state_bytes, parameter_bytes,
                          peak_memory_bytes, profiled_allocation_rises, reset_peak_memory)
from ..errors import UsageError
from ..precision import compute_dtype
from ..run.layerwise import LayerwiseStep
from ..run.step import optimizer_step, prepare_model
from ..wrap import count_parameters
from .build import build, check_size, load_config, parse_dtype, resolve

__all__ = ["LiveGradients", "Measurement", "measure", "measure_method"]


@dataclass(frozen=True)
class Measurement:
    """What ``steps`` real training steps held, in bytes (see the module docstring).

    ``gradients``: the gradients left after the step, or, with a :class:`LiveGradients` observer
    (the optimizer step inside backward), the most alive at once during it.
    ``activations``: with activation checkpointing, without the one recomputed layer (see the
    module docstring); ``peak`` is ``None`` when the profiler gave no allocation events. CPU only: ``peak_optimizer_step`` and
    ``peak_forward_backward`` split the peak by where it happened (in an optimizer step — inside
    backward with the layerwise step — or elsewhere), ``peak_rss`` is the process's.
    """

    device: str
    steps: int
    parameters: int
    trainable_parameters: int
    weights: int
    gradients: int
    optimizer_state: int
    optimizer_extra: int
    activations: int | None
    peak: int | None
    peak_kind: str
    peak_optimizer_step: int | None
    peak_forward_backward: int | None
    peak_rss: int | None
    seconds_per_step: float
    labels: dict[str, Any] = field(default_factory=dict)

    @property
    def model_state(self) -> int:
        return self.weights + self.gradients + self.optimizer_state + self.optimizer_extra

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["model_state"] = self.model_state
        return data


class LiveGradients:
    """The most ``.grad`` bytes alive at once, seen whenever a gradient is complete.

    Post-accumulate-grad hooks on ``model``'s trainable parameters: registered before the
    optimizer-in-backward's own hooks (:meth:`lowrank.run.layerwise.LayerwiseStep.hook_parameters`),
    they run first, when the parameter's gradient is complete and not yet freed — the moments
    the live gradient bytes peak. :meth:`reset` before the step to observe; :attr:`peak` after it.
    """

    def __init__(self, model: nn.Module) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.peak = 0
        self._handles = [p.register_post_accumulate_grad_hook(self._observe) for p in self.params]

    def _observe(self, _: torch.Tensor) -> None:
        live = sum(p.grad.numel() * p.grad.element_size() for p in self.params if p.grad is not None)
        self.peak = max(self.peak, live)

    def reset(self) -> None:
        self.peak = 0

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class _SavedTensors:
    """Unique storages autograd saves for backward, other than the model's own tensors."""

    def __init__(self, model: nn.Module) -> None:
        self.own = {t.untyped_storage().data_ptr() for t in itertools.chain(model.parameters(), model.buffers())}
        self.seen: dict[int, int] = {}

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.numel() and tensor.device.type != "meta":
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in self.own:
                self.seen.setdefault(storage.data_ptr(), storage.nbytes())
        return tensor

    @property
    def total(self) -> int:
        return sum(self.seen.values())


def measure(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    step_fn: Callable[[], Any],
    steps: int,
    *,
    device: torch.device | str | None = None,
    profile: bool = True,
    live_gradients: LiveGradients | None = None,
) -> Measurement:
    """Run ``step_fn`` (one full training step: zero_grad, forward, backward, optimizer step)
    ``steps`` times and report what was held.

    Counts are taken after the last step, when gradients and every optimizer state exist. The
    last step is instrumented (saved-tensor hooks, and on CPU the profiler); the previous step's
    gradients are freed before it (``step_fn`` zeroes them first anyway; the trainer frees them at
    the end of a step). With ``steps > 1`` the time per step is taken from the others. ``live_gradients``: an observer hooked on
    ``model`` (the optimizer step inside backward frees each gradient, so none is left after the
    step): ``gradients`` is then its peak over the last step.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise UsageError(f"steps must be a positive integer, got {steps!r}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        reset_peak_memory(device)
    start = time.perf_counter()
    for _ in range(steps - 1):
        step_fn()
    if cuda:
        torch.cuda.synchronize(device)
    plain_seconds = time.perf_counter() - start

    saved = _SavedTensors(model)
    # Free what earlier steps left now: the previous step's gradients (step_fn's own zero_grad
    # would free them inside the profiled step) and reference cycles (the garbage collector could
    # run inside it). A tensor allocated before the profiler started and freed while it runs is
    # not reliably reported (the CPU profiler pairs a free with an allocation it saw), so it would
    # stay counted in the baseline: the gradients twice at the peak.
    optimizer.zero_grad(set_to_none=True)
    gc.collect()
    baseline = live_bytes(model, optimizer)
    if live_gradients is not None:
        live_gradients.reset()
    use_profiler = profile and not cuda
    start = time.perf_counter()
    rises = None
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        if use_profiler:
            _, rises = profiled_allocation_rises(step_fn)
        else:
            step_fn()
    if cuda:
        torch.cuda.synchronize(device)
    last_seconds = time.perf_counter() - start

    in_step = elsewhere = None
    if cuda:
        peak, kind, rss = int(torch.cuda.max_memory_allocated(device)), "cuda max_memory_allocated", None
    else:
        if rises is not None:
            in_step, elsewhere = baseline + rises[0], baseline + rises[1]
        peak = None if rises is None else max(in_step, elsewhere)
        kind, rss = "torch profiler (CPU allocations)", peak_memory_bytes("cpu")
    counts = count_parameters(model)
    return Measurement(
        device=str(device),
        steps=steps,
        parameters=counts.total,
        trainable_parameters=counts.trainable,
        weights=parameter_bytes(model) + buffer_bytes(model),
        gradients=gradient_bytes(model) if live_gradients is None else live_gradients.peak,
        optimizer_state=optimizer_state_bytes(optimizer),
        optimizer_extra=optimizer_extra_bytes(optimizer),
        activations=saved.total,
        peak=peak,
        peak_kind=kind,
        peak_optimizer_step=in_step,
        peak_forward_backward=elsewhere,
        peak_rss=rss,
        seconds_per_step=plain_seconds / (steps - 1) if steps > 1 else last_seconds,
    )


def measure_method(
    model_config: str | Path | PretrainedConfig,
    method: str | Path,
    *,
    steps: int = 2,
    rank: int | None = None,
    weight_dtype: str | torch.dtype = torch.float32,
    state_dtype: str | torch.dtype | None = None,
    batch_size: int = 1,
    seq_len: int = 2048,
    checkpointing: bool = False,
    layerwise: bool = False,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> Measurement:
    """Build the model and optimizer that :func:`lowrank.memory.estimate` describes (same
    arguments), train ``steps`` steps on random tokens and :func:`measure` them.

    The step is the trainer's: with ``layerwise`` its optimizer step inside backward
    (:class:`lowrank.run.layerwise.LayerwiseStep` armed around backward, no step after it;
    ``gradients`` measured by :class:`LiveGradients`), otherwise backward then
    :func:`lowrank.run.step.optimizer_step`. The layerwise step clips as the trainer's does (in
    place, by the previous step's norm); the ordinary one is not clipped (``clip_grad_norm_``'s
    temporaries are one norm per parameter)."""
    weight_dtype = parse_dtype(weight_dtype, "weight_dtype")
    state_dtype = parse_dtype(state_dtype, "state_dtype")
    check_size("batch_size", batch_size)
    check_size("seq_len", seq_len)
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is visible; use --device cpu")
    config, _ = load_config(model_config)
    config.use_cache = False
    resolved = resolve(method, rank=rank, weight_dtype=weight_dtype, state_dtype=state_dtype, layerwise=layerwise)
    model, optimizer = build(config, resolved, device=device, weight_dtype=weight_dtype, seed=seed)
    model.train()
    # The trainer's preparation and optimizer step (lowrank.run.step): bf16 storage computing in
    # fp32 on a CPU and stepped parameter by parameter, checkpointed layers, as lowrank pretrain runs them.
    compute, _ = compute_dtype(device, weight_dtype, "auto")
    prepare_model(model, storage=weight_dtype, compute=compute, activation_checkpointing=checkpointing)
    rounding = resolved.method.training.bf16_rounding if resolved.method is not None else "stochastic"
    # A peer's optimizer (bitsandbytes) steps bf16 parameters its own way, as its users run it.
    stepped = weight_dtype if resolved.method is not None else torch.float32
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (batch_size, seq_len), generator=generator).to(device)

    def backward() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()

    if resolved.layerwise:
        layerwise_step = LayerwiseStep(optimizer, storage=weight_dtype, rounding=rounding, seed=seed,
                                       grad_clip=resolved.method.training.grad_clip)
        result = _measure_layerwise(model, optimizer, layerwise_step, backward, steps, device)
    else:
        done = itertools.count()

        def step() -> None:
            backward()
            optimizer_step(optimizer, storage=stepped, rounding=rounding, seed=seed, step=next(done))

        result = measure(model, optimizer, step, steps, device=device)
    labels = {"method": resolved.name, "rank": resolved.rank, "layerwise": resolved.layerwise}
    return Measurement(**{**result.__dict__, "labels": labels})


def _measure_layerwise(model: nn.Module, optimizer: torch.optim.Optimizer, layerwise_step: LayerwiseStep,
                       backward: Callable[[], None], steps: int, device: torch.device) -> Measurement:
    """:func:`measure` of the trainer's step with the optimizer inside backward: armed before
    backward (one micro-batch per step), finished after it, no step after it; the gradients by a
    :class:`LiveGradients` hooked first, so that it sees each gradient before it is freed."""
    live = LiveGradients(model)
    layerwise_step.hook_parameters()
    done = itertools.count()

    def step() -> None:
        layerwise_step.arm(next(done))
        backward()
        layerwise_step.finish()

    try:
        return measure(model, optimizer, step, steps, device=device, live_gradients=live)
    finally:
        layerwise_step.close()
        live.close()
