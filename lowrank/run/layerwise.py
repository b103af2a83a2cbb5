"""The optimizer step inside backward (``--layerwise-step``, ``training.layerwise_step``).

Each trainable parameter is updated as soon as its gradient is complete, and its gradient is
freed at once, so a whole set of gradients never exists at the same time (GaLore, Zhao et al.
2024, §4.2 "per-layer weight updates"; torchtitan's optimizer-in-backward). The update is the
optimizer's own per-parameter ``step_param`` — the function its ``step()`` runs for that
parameter — and, with bf16 storage, :func:`lowrank.precision.step_from_bf16` around it with the
rounding draws of :func:`lowrank.precision.step_bf16`: the two paths cannot drift apart.

**Where a gradient is complete.** One process: the parameter's post-accumulate-grad hook. FSDP2:
the sharded parameter's post-accumulate-grad hook, which FSDP2 calls after the reduce-scatter,
on the local shard. DDP: a communication hook per bucket (:meth:`LayerwiseStep.step_bucket`,
wrapped around ``--comm``'s hook), after the all-reduce, so every rank steps from the averaged
gradient; DDP's buckets hold a whole gradient set by design, so under DDP this mode saves no
gradient memory (only the copy back into ``.grad`` is dropped) — FSDP2 or one process does.

**Gradient accumulation.** Only the backward of a step's last micro-batch updates
(:meth:`LayerwiseStep.arm`); the earlier micro-batches accumulate into ``.grad`` as usual, so
with ``grad_accum > 1`` one whole set of gradients lives from the first micro-batch to the last.

**One step for the whole model.** The learning rate is each group's, set by the controller
before backward; the step counter and the restart clock are the controller's; layer events
(refactorization, merges, resets) happen between steps, as without this mode.

**Clipping.** The global norm ‖g_t‖ is known only when backward ends, after most parameters have
stepped. Step ``t``'s gradients are therefore scaled by ``min(1, c / (‖g_{t-1}‖ + 1e-6))`` with the
*previous* step's global norm (``clip_grad_norm_``'s coefficient, one step late). The first step
of a run is not clipped: Adam's first update is ``sign(g)``-sized and Muon's is orthogonalized,
whatever the gradient's scale, so a clip there would change only the scale of the stored moments.
A resumed run carries ``‖g_{t-1}‖`` in its checkpoint.

**Non-finite gradients.** A parameter whose gradient holds a NaN or an infinity is not updated
(neither its value nor its optimizer state) and is counted (:attr:`LayerwiseStep.skipped`); the
step's gradient norm is then non-finite, so the run's health rule (``training.nonfinite_grads``,
``max_skipped_steps``) applies as for a skipped step. The other parameters' updates of that step
stand: undoing them would need every gradient kept, which is what this mode avoids. Deciding
needs each gradient's squared norm on the host: one synchronisation per parameter (per bucket
under DDP), and under FSDP2 one all-reduce of one number per parameter, so every rank decides alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist

from ..optim.shard import local
from ..precision import rounding_generator, step_from_bf16

__all__ = ["LayerwiseStep", "CLIP_EPS"]

CLIP_EPS = 1e-6
"""``torch.nn.utils.clip_grad_norm_``'s guard in ``c / (norm + eps)``."""


class LayerwiseStep:
    """Steps ``optimizer``'s parameters from inside backward (module docstring).

    Args:
        optimizer: has ``step_param(p, grad)`` (:class:`~lowrank.optim.ProjectedAdamW`,
            :class:`~lowrank.optim.Muon`).
        storage: the parameters' storage dtype (bf16: updated in fp32, rounded back).
        rounding: ``training.bf16_rounding``.
        seed: the run's seed (bf16 rounding draws).
        grad_clip: ``training.grad_clip`` (``None`` or 0: no clipping).
        sum_over_ranks: FSDP2: sums a squared shard norm over the ranks (``None``: the gradient
            is whole on this rank).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, storage: torch.dtype, rounding: str, seed: int,
                 grad_clip: float | None, sum_over_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        if not callable(getattr(optimizer, "step_param", None)):
            raise TypeError(f"{type(optimizer).__name__} has no step_param(p, grad): it cannot step inside backward")
        self.optimizer = optimizer
        self.storage, self.rounding, self.seed = storage, rounding, seed
        self.grad_clip = grad_clip or 0.0
        self.sum_over_ranks = sum_over_ranks
        # step_bf16's numbering: every parameter of every group, in order
        self.index = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
        self.previous_norm: float | None = None
        self.armed = False
        self.step = 0
        self.scale = 1.0
        self.squares: dict[int, float] = {}
        self.skipped: list[int] = []
        self._handles: list = []
        self._label = f"Optimizer.step#{type(optimizer).__name__}.step_param"

    # ------------------------------------------------------------------ wiring

    def hook_parameters(self) -> None:
        """Post-accumulate-grad hooks on the optimizer's parameters (one process and FSDP2)."""
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                self._handles.append(p.register_post_accumulate_grad_hook(self._on_gradient))

    def close(self) -> None:
        """Remove the hooks (a new phase builds a new optimizer and a new ``LayerwiseStep``)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _on_gradient(self, p: torch.Tensor) -> None:
        if self.armed:
            self.update(p, p.grad)
            p.grad = None

    def step_bucket(self, bucket: dist.GradBucket) -> None:
        """DDP: update a bucket's parameters from its averaged gradients (its buffer's views)."""
        if self.armed:
            for p, grad in zip(bucket.parameters(), bucket.gradients()):
                if id(p) in self.index:
                    self.update(p, grad)

    # ------------------------------------------------------------------ one step

    def arm(self, step: int) -> None:
        """Before the backward of step ``step + 1``'s last micro-batch (``step``: steps done)."""
        self.armed, self.step = True, step
        self.squares.clear()
        self.skipped.clear()
        norm = self.previous_norm
        self.scale = min(1.0, self.grad_clip / (norm + CLIP_EPS)) if (self.grad_clip and norm is not None) else 1.0

    def update(self, p: torch.Tensor, grad: torch.Tensor) -> None:
        """One parameter's step from its complete gradient (skipped when not finite). Under a
        profiler it is named as torch names an optimizer step, so that profilers
        (:mod:`lowrank.memory.measure`) tell the updates inside backward from the rest of it;
        otherwise it is not labelled, since a label per parameter costs about 2% of a small
        model's step on a CPU."""
        with torch.no_grad():
            if not torch.autograd._profiler_enabled():
                self._update(p, grad)
                return
            with torch.autograd.profiler.record_function(self._label):
                self._update(p, grad)

    def _update(self, p: torch.Tensor, grad: torch.Tensor) -> None:
        index = self.index[id(p)]
        norm = torch.linalg.vector_norm(local(grad), dtype=torch.float32)  # a reduction: no squared copy
        if self.sum_over_ranks is None:
            square = float(norm) ** 2
        else:
            square = float(self.sum_over_ranks(norm.square()))
        self.squares[index] = square
        if not math.isfinite(square):
            self.skipped.append(index)
            return
        if self.scale < 1.0:
            grad.mul_(self.scale)
        if self.storage == torch.float32:
            self.optimizer.step_param(p, grad)
            return
        generator = rounding_generator(p, self.rounding, seed=self.seed, step=self.step, index=index)
        step_from_bf16(self.optimizer.step_param, p, self.rounding, generator, grad=grad)

    def finish(self) -> float:
        """After backward: this step's global gradient norm (non-finite when a parameter was
        skipped), kept for the next step's clip when finite."""
        self.armed = False
        if self.skipped:
            return float("nan")
        norm = math.sqrt(math.fsum(self.squares[i] for i in sorted(self.squares)))
        self.previous_norm = norm
        return norm

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, float | None]:
        return {"previous_norm": self.previous_norm}

    def load_state_dict(self, state: dict[str, float | None]) -> None:
        self.previous_norm = state.get("previous_norm")

