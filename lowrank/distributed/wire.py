"""What goes on the wire: the byte counter of every communication hook and the all-reduce of a
bucket's pieces.

Below both :mod:`.comm` (the DDP hooks) and :mod:`.onebit` (1-bit Adam), which both count bytes
with :class:`CommStats` and all-reduce the gradients they still send in full with
:func:`reduce_pieces`. The counting convention is stated in :mod:`.comm`'s docstring.
"""

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

__all__ = ["CommStats", "Piece", "full_piece", "reduce_pieces", "ring_bytes"]


def ring_bytes(counted: int, world_size: int) -> float:
    """Bytes a rank actually sends for a ring all-reduce of ``counted`` bytes: ``2(w − 1)/w`` of it."""
    return 2.0 * (world_size - 1) / world_size * counted if world_size > 1 else 0.0


class CommStats:
    """Bytes this rank hands to collectives, per training step.

    ``bytes_last_step`` / ``bytes_total`` / ``log`` (bytes of every closed step, in order),
    ``detail_last_step`` (the last step's bytes by what they carried: ``full`` gradient entries,
    ``projected`` GaLore ``R``, ``low_rank`` PowerSGD ``P``/``Q``, ``signs`` / ``scales`` of 1-bit
    Adam, ``basis`` the bases ``projected`` broadcasts after a refresh), ``buckets_last_step``,
    ``sent_full`` (``projected`` only: parameter name → why it travels in full), and
    ``notes_last_step`` (counts a hook reports with its bytes, e.g. 1-bit Adam's tensors in
    warm-up and compressed; logged with them). The counting convention is in :mod:`.comm`'s
    docstring; :func:`ring_bytes` turns a count into a ring all-reduce's per-rank traffic.
    """

    def __init__(self, kind: str, world_size: int) -> None:
        self.kind = kind
        self.world_size = world_size
        self.bytes_total = 0
        self.log: list[int] = []
        self.detail_last_step: dict[str, int] = {}
        self.buckets_last_step = 0
        self.sent_full: dict[str, str] = {}
        self.notes_last_step: dict[str, int] = {}
        self._notes: dict[str, int] = {}
        self._open: Counter[str] = Counter()
        self._buckets = 0

    @property
    def bytes_last_step(self) -> int:
        return self.log[-1] if self.log else 0

    @property
    def steps(self) -> int:
        return len(self.log)

    def add(self, nbytes: int, what: str = "full") -> None:
        """Count ``nbytes`` sent in the step now open, under ``what``."""
        self._open[what] += int(nbytes)

    def note(self, key: str, value: int) -> None:
        """Report ``value`` under ``key`` for the step now open (logged with its bytes)."""
        self._notes[key] = int(value)

    def bucket_done(self) -> None:
        self._buckets += 1

    def end_step(self) -> None:
        """Close the open step (called by the hooks, or by 1-bit Adam's ``step``)."""
        total = sum(self._open.values())
        self.log.append(total)
        self.bytes_total += total
        self.detail_last_step = dict(self._open)
        self.buckets_last_step = self._buckets
        self.notes_last_step, self._notes = self._notes, {}
        self._open.clear()
        self._buckets = 0

    def record(self) -> dict[str, int]:
        """What the training loop logs per step: ``comm_bytes`` (last step), ``comm_bytes_total`` and
        the last step's notes."""
        return {"comm_bytes": self.bytes_last_step, "comm_bytes_total": self.bytes_total, **self.notes_last_step}

    def state_dict(self) -> dict[str, int]:
        return {"bytes_total": self.bytes_total}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue ``bytes_total`` (the per-step ``log`` starts empty)."""
        self.bytes_total = int(state["bytes_total"])


def _ready(tensor: torch.Tensor) -> torch.futures.Future[torch.Tensor]:
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    fut.set_result(tensor)
    return fut


@dataclass
class Piece:
    """One parameter's share of a bucket's all-reduce: ``send`` (this rank's contribution, in the
    bucket's dtype), ``receive`` (called with the averaged ``send``-sized slice) and what it
    carries (a :class:`CommStats` category)."""

    send: torch.Tensor
    receive: Callable[[torch.Tensor], Any]
    what: str = "full"


def full_piece(grad: torch.Tensor) -> Piece:
    """The gradient itself, sent and received in full."""
    return Piece(grad.reshape(-1), lambda mean, grad=grad: grad.copy_(mean.view_as(grad)))


def reduce_pieces(
    bucket: dist.GradBucket, pieces: list[Piece] | None, group: dist.ProcessGroup, stats: CommStats, *,
    close_step: bool = True,
) -> torch.futures.Future[torch.Tensor]:
    """All-reduce (mean) the ``pieces`` of ``bucket`` as one flat buffer, count its bytes, and
    return a future of the bucket once every piece has received its mean. ``None``: the whole
    bucket, in place (PyTorch's ``allreduce_hook``); gradients in no piece stay as they are
    (local). With ``close_step`` the last bucket of the backward closes the step."""
    buffer = bucket.buffer()
    stats.bucket_done()
    if pieces is None:
        stats.add(buffer.numel() * buffer.element_size())
        future = default_hooks.allreduce_hook(group, bucket)
    elif pieces:
        send = torch.cat([piece.send.reshape(-1).to(buffer.dtype) for piece in pieces])
        for piece in pieces:
            stats.add(piece.send.numel() * buffer.element_size(), piece.what)
        send.div_(group.size())

        def unpack(fut: torch.futures.Future[list[torch.Tensor]]) -> torch.Tensor:
            mean, offset = fut.value()[0], 0
            for piece in pieces:
                piece.receive(mean[offset : offset + piece.send.numel()])
                offset += piece.send.numel()
            return buffer

        future = dist.all_reduce(send, group=group, async_op=True).get_future().then(unpack)
    else:
        future = _ready(buffer)
    if close_step and bucket.is_last():
        stats.end_step()
    return future
