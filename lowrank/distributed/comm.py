"""Communication-efficient DDP: gradient compression hooks, with the bytes each rank sends counted.

:func:`register_comm_hook` puts one of these on a ``DistributedDataParallel`` model and returns the
:class:`CommStats` that counts what goes on the wire:

=============  =====================================================================================
``kind``       what each bucket's all-reduce carries (``N`` gradient entries of dtype ``d``)
=============  =====================================================================================
``none``       PyTorch's ``default_hooks.allreduce_hook``: the bucket, ``N·d.itemsize`` bytes (the
               same numerics as DDP without a hook; the hook only adds the count).
``bf16``       PyTorch's ``default_hooks.bf16_compress_hook``: the bucket cast to bfloat16 and
               divided by the world size, ``2N`` bytes; decompressed in place.
``fp16``       PyTorch's ``default_hooks.fp16_compress_hook``: the same in float16, ``2N`` bytes.
``powersgd``   PyTorch's ``powerSGD_hook`` (Vogels, Karimireddy & Jaggi 2019, "PowerSGD: Practical
               Low-Rank Gradient Compression for Distributed Optimization", NeurIPS; with error
               feedback and warm start). Each gradient viewed as ``n × m`` (``shape[0]`` × the
               rest), ``r' = min(n, m, rank)``: it is compressed when
               ``(n + m)·r'·min_compression_rate < n·m`` and then its ``P`` (``n × r'``) and ``Q``
               (``m × r'``) are all-reduced, ``(n + m)·r'·d.itemsize`` bytes; every other tensor
               (vectors, small matrices) is all-reduced in full. Before ``start_powerSGD_iter``
               the whole bucket is all-reduced (``N·d.itemsize``). Defaults here:
               ``matrix_approximation_rank=4`` (PyTorch's default is 1; the paper and PyTorch's
               tuning notes find 1–4 enough for most models, 4 is the safe end) and
               ``start_powerSGD_iter=1000`` (PyTorch's default; its notes ask for at least the LR
               warm-up: ``lowrank pretrain`` passes ``--freeze-step``, by default the run's LR
               warm-up, at least 2). On gloo each bucket's hook finishes before the next starts
               (:func:`_one_bucket_at_a_time`).
``projected``  ours, below: GaLore-style projected gradients between projector refreshes.
``onebit``     the gradient hook of 1-bit Adam (:mod:`lowrank.distributed.onebit`): full
               all-reduce during the optimizer's warm-up, nothing after it (the optimizer
               all-reduces its 1-bit compressed momentum itself).
=============  =====================================================================================

**What is counted.** For each collective a hook issues, the bytes of the tensor this rank hands
to it: an all-reduce of ``N`` elements of dtype ``d`` counts ``N·d.itemsize``. That is the size
of the reduced payload, not the traffic: a ring all-reduce (NCCL, gloo) sends about
``2(w − 1)/w`` of it per rank (a reduce-scatter then an all-gather, each moving ``(w − 1)/w``),
for ``w`` ranks. 1-bit Adam's compressed all-reduce is counted the same way (its packed signs
plus scales, :mod:`.onebit`), and its scatter/gather moves exactly ``2(w − 1)/w`` of that. Bytes
are counted when the collective is issued, per bucket, and a step closes with the last bucket of
the backward pass (``GradBucket.is_last()``; with ``onebit``, when the optimizer has sent its
momentum, so the gradients of a step whose ``optimizer.step()`` is skipped count with the next).
DDP's broadcast of the weights at construction is not counted (it is not per step).

**Projected gradients** (``kind="projected"``; no peer library does this). A GaLore-style
:class:`~lowrank.optim.ProjectedAdamW` (groups with ``projection`` ``"svd"`` or ``"randomized"``,
arXiv 2403.03507) only ever uses ``R = PᵀG`` (``m < n``) or ``R = G P`` (``m ≥ n``) of a 2-D
gradient ``G`` between refreshes of its basis ``P`` (``min(m, n) × r``). Projection is linear, so
``project(mean_i G_i) = mean_i project(G_i)``: the hook all-reduces each rank's ``R_i`` (``r/min(m,
n)`` of the matrix's bytes) instead of ``G_i`` and writes the back-projection ``P·R̄`` (``R̄ Pᵀ``)
into the bucket, which the optimizer projects again: ``Pᵀ(P R̄) = R̄`` because ``P`` has
orthonormal columns (SVD or QR; to fp32 rounding, ~1e-7 relative), so the optimizer's moments
and update equal those of uncompressed DDP up to float reduction order. On a refresh step (the
parameter's ``total_step`` a multiple of ``update_proj_gap``, and its first step) the full ``G`` is
all-reduced: the optimizer computes the new ``P`` from the averaged ``G``, so every rank holds the
same ``P`` without sending it. Design choice: the back-projection (one ``m·n·r`` matmul, as costly
as the optimizer's own projection) keeps the optimizer untouched and its ``p.grad`` a gradient;
handing ``R̄`` to the optimizer directly would save that matmul but needs an optimizer hook.

Side effects of what ``p.grad`` then holds for the projected matrices: ``P R̄``, the in-subspace
part of the mean gradient. A global-norm clip (``clip_grad_norm_``) sees ``‖R̄‖ ≤ ‖Ḡ‖`` for them,
so it engages later than with uncompressed DDP; the norm is still the same on every rank.

Parameters whose update needs the full gradient are sent in full, every step, and listed in
:attr:`CommStats.sent_full` with the reason (the rest of the method keeps its savings): Fira's
residual ``G − P PᵀG`` (``residual="fira"``), APOLLO's channel scaling of the raw gradient
(``projection="random"``), Stable-SPAM's ``adaptive_clip`` / ``norm_scaling`` (non-linear in ``G``,
applied before the projection), and a rank that is not below ``min(m, n)`` (nothing to save).
Parameters without projection (embeddings, norms, biases) in the same bucket are sent in full.
An optimizer with no parameter the hook can project is refused with a one-line ``ValueError``.
Buckets are mapped to parameters through ``GradBucket.parameters()`` and ``gradients()`` (views
of the bucket at their offsets), so DDP's reversed and rebuilt bucket order does not matter.

**Integration** (the training loop; ``wrap_ddp`` is :func:`lowrank.distributed.setup.wrap_ddp`)::

    ddp = wrap_ddp(model, info, device)                     # before torch.compile
    stats = register_comm_hook(ddp, cfg.comm, optimizer=optimizer, start_step=resumed_step)
    ...                                                     # each step: backward, clip, optimizer.step()
    metrics.update(stats.record())                          # comm_bytes, comm_bytes_total

``register_comm_hook`` checks ``kind`` against the optimizer first (so a bad combination fails
before the first step, also on one process) and returns a zero-counting :class:`CommStats` when
the model is not wrapped in DDP (one process). For ``--comm onebit`` build the optimizer as
:class:`lowrank.distributed.onebit.OneBitAdam` and pass it (see that module). ``start_step``: the
step a resumed run starts at, so PowerSGD's vanilla-all-reduce phase is not replayed; PowerSGD's
error-feedback and warm-start memories live in its hook state, which PyTorch does not checkpoint,
so they restart empty after a resume (``projected`` and ``onebit`` keep theirs in the optimizer's
state and resume exactly). Save ``stats.state_dict()`` with the trainer state to keep
``bytes_total`` across a resume.
"""

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd

from ..optim import ProjectedAdamW
from ..optim import projection as proj

__all__ = ["KINDS", "POWERSGD_DEFAULTS", "CommStats", "Piece", "full_piece", "projected_hook", "reduce_pieces",
           "register_comm_hook", "ring_bytes"]

KINDS = ("none", "bf16", "fp16", "powersgd", "projected", "onebit")

POWERSGD_DEFAULTS: dict[str, Any] = {"matrix_approximation_rank": 4, "start_powerSGD_iter": 1000}

# Projections whose update uses only R between refreshes (GaLore), and so can travel projected.
_LINEAR_PROJECTIONS = ("svd", "randomized")


def ring_bytes(counted: int, world_size: int) -> float:
    """Bytes a rank actually sends for a ring all-reduce of ``counted`` bytes: ``2(w − 1)/w`` of it."""
    return 2.0 * (world_size - 1) / world_size * counted if world_size > 1 else 0.0


class CommStats:
    """Bytes this rank hands to collectives, per training step.

    ``bytes_last_step`` / ``bytes_total`` / ``log`` (bytes of every closed step, in order),
    ``detail_last_step`` (the last step's bytes by what they carried: ``full`` gradient entries,
    ``projected`` GaLore ``R``, ``low_rank`` PowerSGD ``P``/``Q``, ``signs`` / ``scales`` of 1-bit
    Adam), ``buckets_last_step``, and ``sent_full`` (``projected`` only: parameter name → why it
    travels in full). The counting convention is in the module docstring; :func:`ring_bytes` turns
    a count into a ring all-reduce's per-rank traffic.
    """

    def __init__(self, kind: str, world_size: int) -> None:
        self.kind = kind
        self.world_size = world_size
        self.bytes_total = 0
        self.log: list[int] = []
        self.detail_last_step: dict[str, int] = {}
        self.buckets_last_step = 0
        self.sent_full: dict[str, str] = {}
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

    def bucket_done(self) -> None:
        self._buckets += 1

    def end_step(self) -> None:
        """Close the open step (called by the hooks, or by 1-bit Adam's ``step``)."""
        total = sum(self._open.values())
        self.log.append(total)
        self.bytes_total += total
        self.detail_last_step = dict(self._open)
        self.buckets_last_step = self._buckets
        self._open.clear()
        self._buckets = 0

    def record(self) -> dict[str, int]:
        """What the training loop logs per step: ``comm_bytes`` (last step) and ``comm_bytes_total``."""
        return {"comm_bytes": self.bytes_last_step, "comm_bytes_total": self.bytes_total}

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


# ---------------------------------------------------------------------- PyTorch's hooks, counted


def _counted(hook: Callable, state: Any, stats: CommStats, count: Callable[[dist.GradBucket], dict[str, int]]):
    """``hook`` with the bytes ``count(bucket)`` says it sends added to ``stats`` (computed before
    the hook runs, from the same state it decides with)."""

    def counted_hook(hook_state: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        for what, nbytes in count(bucket).items():
            stats.add(nbytes, what)
        stats.bucket_done()
        future = hook(hook_state, bucket)
        if bucket.is_last():
            stats.end_step()
        return future

    return counted_hook


def _one_bucket_at_a_time(hook: Callable) -> Callable:
    """``hook``, finished before the next bucket's starts.

    ``powerSGD_hook`` issues a bucket's second and third all-reduces (``P``, then ``Q``) from
    future callbacks. On gloo those run on its worker threads as earlier collectives complete, so
    with several buckets the ranks can issue them in different orders; gloo pairs collectives by
    issue order, and the run hangs or aborts ("Received data size doesn't match expected size").
    Waiting for each bucket keeps one order on every rank, at the cost of overlapping one bucket's
    compression with the next bucket's backward. (NCCL orders them on one stream.)
    """

    def ordered_hook(hook_state: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        done: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        done.set_result(hook(hook_state, bucket).wait())
        return done

    return ordered_hook


def _bucket_bytes(itemsize: int | None = None) -> Callable[[dist.GradBucket], dict[str, int]]:
    def count(bucket: dist.GradBucket) -> dict[str, int]:
        buffer = bucket.buffer()
        return {"full": buffer.numel() * (itemsize or buffer.element_size())}

    return count


def _powersgd_bytes(state: powersgd.PowerSGDState) -> Callable[[dist.GradBucket], dict[str, int]]:
    """What ``powerSGD_hook`` will all-reduce for ``bucket``, by its own rule (``_should_compress``)."""

    def count(bucket: dist.GradBucket) -> dict[str, int]:
        buffer = bucket.buffer()
        itemsize = buffer.element_size()
        if state.iter < state.start_powerSGD_iter:
            return {"full": buffer.numel() * itemsize}
        full = low_rank = 0
        for grad in bucket.gradients():
            n, m = grad.view(grad.shape[0], -1).shape
            rank = min(n, m, state.matrix_approximation_rank)
            if powersgd._should_compress(n, m, rank, state.min_compression_rate)[0]:
                low_rank += (n + m) * rank
            else:
                full += grad.numel()
        return {"full": full * itemsize, "low_rank": low_rank * itemsize}

    return count


# ---------------------------------------------------------------------- projected (GaLore)


def _full_gradient_reason(p: torch.Tensor, group: dict[str, Any]) -> str | None:
    """Why a parameter of a projected group must travel in full (``None``: it can go projected)."""
    if group["projection"] not in _LINEAR_PROJECTIONS:
        return "APOLLO (projection='random') scales the raw full gradient per channel"
    if group.get("residual") == "fira":
        return "Fira's residual G - P Pᵀ G needs the full gradient"
    if group.get("adaptive_clip") or group.get("norm_scaling"):
        return "Stable-SPAM's adaptive_clip / norm_scaling transform the full gradient before projection"
    if proj.effective_rank(p.shape, group["rank"]) >= min(p.shape):
        return f"rank {group['rank']} >= min{tuple(p.shape)}: projecting saves nothing"
    return None


class _ProjectedHook:
    """The state of the ``projected`` hook: which parameters travel projected, read live from the
    optimizer (its groups' options, each parameter's ``projector`` and ``total_step``)."""

    def __init__(self, optimizer: torch.optim.Optimizer, names: dict[int, str], group: dist.ProcessGroup | None,
                 stats: CommStats) -> None:
        self.optimizer = optimizer
        self.group = group
        self.stats = stats
        self.projected: dict[int, dict[str, Any]] = {}
        for options in optimizer.param_groups if isinstance(optimizer, ProjectedAdamW) else []:
            if options["projection"] is None:
                continue
            for p in options["params"]:
                if p.dim() != 2:
                    continue
                reason = _full_gradient_reason(p, options)
                if reason is None:
                    self.projected[id(p)] = options
                else:
                    stats.sent_full[names.get(id(p), f"a {tuple(p.shape)} matrix")] = reason
        if not self.projected:
            why = "; ".join(sorted(set(stats.sent_full.values()))) or "no ProjectedAdamW group has projection 'svd' or 'randomized'"
            raise ValueError(f"--comm projected needs GaLore-style projection (ProjectedAdamW with projection 'svd' or "
                             f"'randomized' on 2-D parameters): this optimizer has none ({why}); use --comm bf16 or powersgd")

    def basis(self, p: torch.Tensor) -> torch.Tensor | None:
        """``P`` the optimizer will use at its next step, or ``None`` when that step refreshes it
        (first step, or ``total_step`` a multiple of ``update_proj_gap``, as ProjectedAdamW decides)."""
        from ..optim.adamw import projector_refresh_due

        options = self.projected.get(id(p))
        state = self.optimizer.state.get(p) if options is not None else None
        if not state or projector_refresh_due(p, options, state):
            return None
        return state["projector"]

    def reduce(self, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        pieces: list[Piece] = []
        for p, grad in zip(bucket.parameters(), bucket.gradients()):
            basis = self.basis(p)
            if basis is None:
                pieces.append(full_piece(grad))
                continue
            low = proj.project(grad.to(basis.dtype), basis)

            def receive(mean: torch.Tensor, grad=grad, basis=basis, shape=low.shape) -> None:
                grad.copy_(proj.project_back(mean.view(shape).to(basis.dtype), basis, grad.shape))

            pieces.append(Piece(low, receive, "projected"))
        whole = all(piece.what == "full" for piece in pieces)
        return reduce_pieces(bucket, None if whole else pieces, self.group or dist.group.WORLD, self.stats)


def projected_hook(state: _ProjectedHook, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """The ``projected`` DDP communication hook (module docstring); ``state`` is made by
    :func:`register_comm_hook`."""
    return state.reduce(bucket)


# ---------------------------------------------------------------------- registration


def _ddp(model: nn.Module) -> nn.parallel.DistributedDataParallel | None:
    model = getattr(model, "_orig_mod", model)  # torch.compile'd DDP
    return model if isinstance(model, nn.parallel.DistributedDataParallel) else None


def register_comm_hook(
    ddp_model: nn.Module,
    kind: str,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    process_group: dist.ProcessGroup | None = None,
    start_step: int = 0,
    **powersgd_options: Any,
) -> CommStats:
    """Register the ``kind`` communication hook (module docstring) on ``ddp_model``; return its byte counter.

    ``optimizer``: required for ``projected`` (a GaLore-style ``ProjectedAdamW``) and ``onebit``
    (a :class:`~lowrank.distributed.onebit.OneBitAdam`, whose own counter is returned).
    ``process_group``: default the world. ``start_step``: the step a resumed run starts at
    (PowerSGD's clock). ``powersgd_options``: ``PowerSGDState`` arguments over
    :data:`POWERSGD_DEFAULTS`. A model not wrapped in DDP (one process) gets no hook and a counter
    that stays at zero; the arguments are checked all the same.
    """
    if kind not in KINDS:
        raise ValueError(f"--comm {kind!r}: expected one of {', '.join(KINDS)}")
    if powersgd_options and kind != "powersgd":
        raise ValueError(f"--comm {kind}: PowerSGD options {sorted(powersgd_options)} apply to --comm powersgd only")
    ddp = _ddp(ddp_model)
    world = (process_group or dist.group.WORLD).size() if ddp is not None else 1
    module = ddp.module if ddp is not None else ddp_model
    names = {id(p): name for name, p in module.named_parameters()}
    if kind == "onebit":
        from .onebit import OneBitAdam, onebit_hook

        if not isinstance(optimizer, OneBitAdam):
            raise ValueError(f"--comm onebit needs the optimizer built as lowrank.distributed.onebit.OneBitAdam, "
                             f"got {type(optimizer).__name__}")
        stats = optimizer.comm_stats
        stats.world_size = world
        hook, state = onebit_hook, optimizer
    elif kind == "projected":
        if optimizer is None:
            raise ValueError("--comm projected needs the optimizer (register_comm_hook(..., optimizer=...))")
        stats = CommStats(kind, world)
        state, hook = _ProjectedHook(optimizer, names, process_group, stats), projected_hook
    else:
        stats = CommStats(kind, world)
        state = process_group
        if kind == "powersgd":
            options = {**POWERSGD_DEFAULTS, **powersgd_options}
            state = powersgd.PowerSGDState(process_group=process_group, **options)
            # Resume the vanilla phase where it was, keeping two vanilla steps that DDP's bucket rebuild needs.
            state.iter = max(0, min(start_step, state.start_powerSGD_iter - 2))
            hook = _counted(powersgd.powerSGD_hook, state, stats, _powersgd_bytes(state))
            if dist.get_backend(process_group) == "gloo":
                hook = _one_bucket_at_a_time(hook)
        else:
            base = {"none": default_hooks.allreduce_hook, "bf16": default_hooks.bf16_compress_hook,
                    "fp16": default_hooks.fp16_compress_hook}[kind]
            hook = _counted(base, state, stats, _bucket_bytes(None if kind == "none" else 2))
    if ddp is not None:
        ddp.register_comm_hook(state, hook)
    return stats

