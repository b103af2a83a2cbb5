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
momentum, and with ``projected`` after the optimizer step, which may broadcast refreshed bases: so
the gradients of a step whose ``optimizer.step()`` is skipped count with the next).
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
all-reduced and every rank computes the new ``P`` from the averaged ``G``; since an SVD is defined
up to the sign of each singular vector and two ranks' LAPACK calls may round differently, rank 0's
refreshed matrices, ``P`` and moments are then broadcast to all (:meth:`_ProjectedHook.share_refreshed`,
an optimizer step post-hook; ``m·n + r·min(m, n) + 2r·max(m, n)`` entries per refreshed matrix,
counted under ``basis``), so the ranks stay bit-identical. Design choice: the back-projection (one ``m·n·r`` matmul, as costly
as the optimizer's own projection) keeps the optimizer untouched and its ``p.grad`` a gradient;
handing ``R̄`` to the optimizer directly would save that matmul but needs an optimizer hook.

**Gradient clipping differs from plain DDP** between refreshes: ``p.grad`` holds ``P R̄``, the
in-subspace part of the mean gradient, so a global-norm clip (``clip_grad_norm_``) sees
``‖P R̄‖ ≤ ‖Ḡ‖`` for these matrices (``‖Ḡ‖² = ‖P R̄‖² + ‖Ḡ − P PᵀḠ‖²``) and engages later than with
uncompressed DDP (on refresh steps it sees ``‖Ḡ‖``); the norm is the same on every rank. This is
not made exact: the residual of the mean gradient is the mean of the ranks' residuals, and its
norm needs their inner products, i.e. the residuals themselves (a per-rank squared norm gives
``mean‖r_i‖² ≥ ‖mean r_i‖²``, another approximation). Without clipping (``training.grad_clip=0``)
the optimizer's steps equal plain DDP's; with it, expect small differences (``galore``, clip 1.0,
tiny model: logged norm 1.33 vs 1.68, losses within 7e-3 after 10 steps).

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

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd

from ..optim import ProjectedAdamW, projector_refresh_due
from ..optim import projection as proj
from .onebit import OneBitAdam, onebit_hook
from .wire import CommStats, Piece, full_piece, reduce_pieces, ring_bytes

__all__ = ["KINDS", "POWERSGD_DEFAULTS", "CommStats", "Piece", "full_piece", "projected_hook", "reduce_pieces",
           "register_comm_hook", "ring_bytes"]

KINDS = ("none", "bf16", "fp16", "powersgd", "projected", "onebit")

POWERSGD_DEFAULTS: dict[str, Any] = {"matrix_approximation_rank": 4, "start_powerSGD_iter": 1000}

# Projections whose update uses only R between refreshes (GaLore), and so can travel projected.
_LINEAR_PROJECTIONS = ("svd", "randomized")


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


def _then_step(hook: Callable, after_reduce: Callable[[dist.GradBucket], None]) -> Callable:
    """``hook``, then ``after_reduce(bucket)`` once the bucket's buffer holds the averaged gradient
    (the optimizer step inside backward, :mod:`lowrank.run.layerwise`).

    Waits for the bucket's reduction in the hook itself, on the thread that runs backward, rather
    than in a future callback (torch's ``_hook_then_optimizer``): gloo runs callbacks on its
    worker threads, where two buckets' steps could run at once and in a different order on each
    rank. The price is the overlap of a bucket's reduction with the next bucket's backward.
    """

    def hook_then_step(hook_state: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        reduced = hook(hook_state, bucket).wait()
        buffer = bucket.buffer()
        if reduced.data_ptr() != buffer.data_ptr():
            buffer.copy_(reduced)  # bucket.gradients() are views of the buffer
        after_reduce(bucket)
        done: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        done.set_result(buffer)
        return done

    return hook_then_step


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
        # every matrix whose basis the optimizer computes from the gradient (Fira's too), in optimizer order
        self.from_gradient: list[tuple[torch.Tensor, dict[str, Any]]] = []
        self.refreshing: list[torch.Tensor] = []
        for options in optimizer.param_groups if isinstance(optimizer, ProjectedAdamW) else []:
            if options["projection"] is None:
                continue
            for p in options["params"]:
                if p.dim() != 2:
                    continue
                if options["projection"] in _LINEAR_PROJECTIONS:
                    self.from_gradient.append((p, options))
                reason = _full_gradient_reason(p, options)
                if reason is None:
                    self.projected[id(p)] = options
                else:
                    stats.sent_full[names.get(id(p), f"a {tuple(p.shape)} matrix")] = reason
        if not self.projected:
            why = "; ".join(sorted(set(stats.sent_full.values()))) or "no ProjectedAdamW group has projection 'svd' or 'randomized'"
            raise ValueError(f"--comm projected needs GaLore-style projection (ProjectedAdamW with projection 'svd' or "
                             f"'randomized' on 2-D parameters): this optimizer has none ({why}); use --comm bf16 or powersgd")

    def basis(self, p: torch.Tensor, options: dict[str, Any] | None = None) -> torch.Tensor | None:
        """``P`` the optimizer will use at its next step, or ``None`` when that step refreshes it
        (first step, or ``total_step`` a multiple of ``update_proj_gap``, as ProjectedAdamW decides)."""
        options = options or self.projected.get(id(p))
        state = self.optimizer.state.get(p) if options is not None else None
        if not state or projector_refresh_due(p, options, state):
            return None
        return state["projector"]

    def note_refreshes(self) -> None:
        """Before an optimizer step: the matrices whose basis it will refresh."""
        self.refreshing = [p for p, options in self.from_gradient if self.basis(p, options) is None]

    def share_refreshed(self) -> None:
        """After an optimizer step that refreshed bases: every rank takes rank 0's refreshed
        matrices, their new ``P`` and their moments (one broadcast).

        Each rank computes ``P`` from the same averaged gradient, but an SVD is defined up to the
        sign of each singular vector, and a rounding-level difference between the ranks' LAPACK
        (threads, GPU kernels) can flip one: the ranks' updates then differ (the moments live in
        the old basis) and never meet again. The broadcast, once per refresh (``m·n`` plus ``P``
        and the moments per matrix, every ``update_proj_gap`` steps), keeps them bit-identical; it
        is counted under ``basis``. Called by the optimizer's step post-hook, which also closes
        the step's byte count (a skipped step counts with the next)."""
        due, self.refreshing = self.refreshing, []
        tensors = []
        for p in due:
            state = self.optimizer.state.get(p, {})
            tensors += [p.data] + [state[key] for key in sorted(state) if torch.is_tensor(state[key])]
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        group = self.group or dist.group.WORLD
        for same in by_dtype.values():  # one broadcast per dtype (moments may be quantized codes)
            flat = torch.cat([t.reshape(-1) for t in same])
            dist.broadcast(flat, group=group, group_src=0)
            self.stats.add(flat.numel() * flat.element_size(), "basis")
            offset = 0
            for t in same:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()
        self.stats.end_step()

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
        return reduce_pieces(bucket, None if whole else pieces, self.group or dist.group.WORLD, self.stats,
                             close_step=False)


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
    after_reduce: Callable[[dist.GradBucket], None] | None = None,
    **powersgd_options: Any,
) -> CommStats:
    """Register the ``kind`` communication hook (module docstring) on ``ddp_model``; return its byte counter.

    ``optimizer``: required for ``projected`` (a GaLore-style ``ProjectedAdamW``) and ``onebit``
    (a :class:`~lowrank.distributed.onebit.OneBitAdam`, whose own counter is returned).
    ``process_group``: default the world. ``start_step``: the step a resumed run starts at
    (PowerSGD's clock). ``powersgd_options``: ``PowerSGDState`` arguments over
    :data:`POWERSGD_DEFAULTS`. ``after_reduce``: called with each bucket once its gradient is
    averaged (:func:`_then_step`; not with ``onebit`` or ``projected``, whose optimizer step is
    their own). A model not wrapped in DDP (one process) gets no hook and a counter
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
        if ddp is not None:
            optimizer.register_step_pre_hook(lambda *_: state.note_refreshes())
            optimizer.register_step_post_hook(lambda *_: state.share_refreshed())
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
    if after_reduce is not None:
        if kind in ("onebit", "projected"):
            raise ValueError(f"--comm {kind} steps the optimizer itself after the whole gradient is reduced; "
                             "it does not compose with an optimizer step per bucket")
        hook = _then_step(hook, after_reduce)
    if ddp is not None:
        ddp.register_comm_hook(state, hook)
    return stats

