"""Is training still healthy? Non-finite gradients, non-finite weights or optimizer state, and
dead runs, decided from numbers the loop already has or can get in one cheap pass.

* A **non-finite gradient norm** (``clip_grad_norm_`` computes it every step, after DDP's
  all-reduce, so every rank sees the same value) means the step would write NaN into the
  weights. ``training.nonfinite_grads`` says what to do: ``skip`` (default) drops that step's
  update — the data, the schedule and the restart clock move on, as a spike-tolerant optimizer
  would want (SPAM's motivation: one bad batch should not cost a restart) — and stops once
  ``training.max_skipped_steps`` steps in a row were skipped; ``stop`` ends the run at once.
* **Non-finite weights or optimizer state** (an update that overflowed) are checked before a
  checkpoint is written (one ``foreach`` norm over the parameters and the state tensors), so a
  diverged state never becomes ``latest``.
* A **dead run** (every gradient exactly zero, e.g. after ``--lr 1000`` saturated the model; the
  loss then sits at ``ln(vocab)``) stops after ``training.dead_steps`` such steps in a row.

Every stop is a :class:`~lowrank.errors.UsageError` whose message names the last good checkpoint
and what to change when resuming from it. A checkpoint is good when it comes from before the state
that produced the first bad gradient of the streak that ended the run
(:meth:`StepHealth.last_trusted_step`); the loop writes none while a streak is in progress, and a
run that ends with a zero gradient is dead too (:meth:`StepHealth.check_alive_at_end`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

__all__ = ["first_nonfinite", "StepHealth"]


@torch.no_grad()
def first_nonfinite(named: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The name of a floating tensor holding a NaN or an infinity (the first of its device and dtype), else ``None``.

    One ``torch._foreach_norm`` per device and dtype, accumulated in fp32 (a NaN or inf anywhere
    makes the norm non-finite; an fp16 tensor's squares do not overflow), and only when one is not
    finite a second pass to find which. torch casts one tensor at a time for it: fp32 copies of
    all bf16 weights of a 7B model at once would be 10 GiB at the moment a checkpoint is written.
    """
    items = [(name, t) for name, t in named if torch.is_tensor(t) and t.is_floating_point() and t.numel()]
    if not items:
        return None
    tensors = [t.detach() for _, t in items]
    by_kind: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        by_kind.setdefault((t.device, t.dtype), []).append(i)
    for indices in by_kind.values():
        norms = torch._foreach_norm([tensors[i] for i in indices], 2, dtype=torch.float32)
        finite = torch.isfinite(torch.stack(norms))
        if not bool(finite.all()):
            return items[indices[int((~finite).nonzero()[0])]][0]
    return None


class StepHealth:
    """Counts skipped and zero-gradient steps in a row and says when to stop.

    Args:
        policy: ``"skip"`` or ``"stop"`` for a non-finite gradient norm.
        max_skipped_steps: stop after this many skipped steps in a row.
        dead_steps: stop after this many steps in a row whose gradient norm is exactly zero.
    """

    def __init__(self, policy: str, max_skipped_steps: int, dead_steps: int) -> None:
        self.policy = policy
        self.max_skipped_steps = max_skipped_steps
        self.dead_steps = dead_steps
        self.skipped_in_a_row = 0
        self.skipped_total = 0
        self.zero_in_a_row = 0

    def should_skip(self, grad_norm: float) -> bool:
        """``True`` when this step's update must be dropped. Raises ``StopTraining`` (a message)
        when the policy or the counters say the run cannot go on."""
        if math.isfinite(grad_norm):
            self.skipped_in_a_row = 0
            self.zero_in_a_row = self.zero_in_a_row + 1 if grad_norm == 0.0 else 0
            if self.dead_steps and self.zero_in_a_row >= self.dead_steps:
                raise StopTraining(f"the gradient has been exactly zero for {self.zero_in_a_row} steps in a row: the run is "
                                   "dead (the loss sits at ln(vocab); usually a learning rate far too high)")
            return False
        self.zero_in_a_row = 0
        if self.policy == "stop":
            raise StopTraining(f"the gradient norm became {grad_norm} (training.nonfinite_grads=stop)")
        self.skipped_in_a_row += 1
        self.skipped_total += 1
        if self.skipped_in_a_row >= self.max_skipped_steps:
            raise StopTraining(f"the gradient norm was non-finite for {self.skipped_in_a_row} steps in a row "
                               f"(training.max_skipped_steps={self.max_skipped_steps}): training diverged")
        return True

    @property
    def bad_in_a_row(self) -> int:
        """How many of the last steps seen in a row had a zero or a non-finite gradient (0: the last was healthy)."""
        return max(self.zero_in_a_row, self.skipped_in_a_row)

    def last_trusted_step(self, seen: int) -> int:
        """The newest state to resume from once step ``seen``'s gradient has been checked.

        Step ``k``'s gradient is computed on the state after step ``k − 1``. When the last
        ``n = bad_in_a_row`` gradients were zero or non-finite, the state after ``seen − n`` is the
        one that first produced a bad gradient (on the same data a resume replays it, whatever the
        lr), and every later state is as dead or as broken: only states up to ``seen − n − 1`` are trusted."""
        return seen - self.bad_in_a_row - 1

    def check_alive_at_end(self) -> None:
        """A run that ends with an exactly zero gradient is dead (nothing can learn from it), however
        few steps that lasted: stop rather than report it a success (``dead_steps=0``: never)."""
        if self.dead_steps and self.zero_in_a_row:
            raise StopTraining(f"the gradient was exactly zero for the last {self.zero_in_a_row} steps of the run: the run "
                               "is dead (the loss sits at ln(vocab); usually a learning rate far too high)")


class StopTraining(Exception):
    """Raised by :class:`StepHealth`; the loop turns it into a UsageError naming the last good checkpoint."""
