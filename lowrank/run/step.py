"""What makes a training step the trainer's, shared by ``lowrank pretrain`` (:mod:`.loop`) and
``lowrank memory --measure`` (:mod:`lowrank.memory.measure`), so that what is measured is what
trains: how the model is prepared for the step (parameter storage, compute dtype, activation
checkpointing) and how the optimizer steps (all at once in fp32, or parameter by parameter in
fp32 from bf16 storage)."""

from __future__ import annotations

import torch
from torch import nn

from ..checkpointing import enable_activation_checkpointing
from ..precision import compute_in, step_bf16, store_parameters

__all__ = ["prepare_model", "optimizer_step"]


def prepare_model(model: nn.Module, *, storage: torch.dtype, compute: torch.dtype,
                  activation_checkpointing: bool) -> nn.Module:
    """Store the parameters in ``storage`` (those a method just added too), compute in
    ``compute`` when it differs (fp32 from bf16 storage on a CPU), and checkpoint every decoder
    layer if asked. Call it on the bare model after :func:`lowrank.methods.apply_method` and before
    DDP / FSDP2 wrap it; calling it again after another ``apply_method`` is safe."""
    store_parameters(model, storage)
    if compute != storage:
        compute_in(model, compute)
    if activation_checkpointing:
        enable_activation_checkpointing(model)
    return model


def optimizer_step(optimizer: torch.optim.Optimizer, *, storage: torch.dtype, rounding: str, seed: int, step: int) -> None:
    """``optimizer.step()`` for fp32 parameters; for bf16 ones, each parameter updated in fp32 and
    rounded back with the preset's ``training.bf16_rounding`` (:func:`lowrank.precision.step_bf16`;
    ``step`` is the run's step, which seeds the rounding)."""
    if storage == torch.float32:
        optimizer.step()
        return
    # Named as torch.optim.Optimizer.step names itself, so profilers (lowrank.memory.measure) see the step.
    with torch.autograd.profiler.record_function(f"Optimizer.step#{type(optimizer).__name__}.step"):
        step_bf16(optimizer, rounding, seed=seed, step=step)
