r"""1-bit Adam: Adam whose momentum is all-reduced at 1 bit per entry after a warm-up.

Tang, Gan, Awan, Rajbhandari, Li, Lian, Liu, Zhang & He 2021, "1-bit Adam: Communication
Efficient Large-Scale Training with Adam's Convergence Speed" (ICML, arXiv 2102.02888).

**Algorithm** (:class:`OneBitAdam`, per parameter, ``t`` its step since the start or the last reset):

* warm-up, ``t ≤ freeze_step``: AdamW exactly as ``torch.optim.AdamW`` (decoupled weight decay,
  bias correction), on the gradient DDP has averaged over the ranks (uncompressed all-reduce);
* then ``v`` is frozen (``v_T``, ``T = freeze_step``, bias-corrected once: ``v̂ = v_T/(1 − β2^T)``)
  and used as a fixed preconditioner. Each worker updates its momentum with its *local* gradient,
  ``m ← β1 m + (1 − β1) g_local``, and the momenta are averaged by the compressed all-reduce below;
  the update is ``p ← p(1 − lr·wd) − lr/(1 − β1^t) · m / (sqrt(v̂) + eps)``. DDP's gradient
  all-reduce is off for these parameters (:func:`onebit_hook` returns the local gradient).

**Compressed all-reduce** (:func:`compressed_allreduce`) of a tensor ``x`` over ``w`` ranks: ``x`` is
flattened and zero-padded to ``N' = ceil(N/8w)·8w`` entries and cut into ``w`` chunks of ``C = N'/w``;
rank ``i`` is the server of chunk ``i``. The compressor, per chunk, is
``C(x) = ‖x‖₁/numel · sign(x)`` (``numel``: the chunk's real entries; ``sign(0) = +1``, the wire
has no zero), which is the scaled sign closest to ``x`` in ``ℓ2``.

1. worker, with its error ``e`` (``N'`` entries): ``y = x + e``, send ``C(y)`` chunk by chunk,
   ``e ← y − C(y)`` (error feedback: ``e ← x + e − C(x + e)``);
2. server ``i``, with its error ``e_i`` (``C`` entries): receive chunk ``i`` from every rank
   (all-to-all), ``z = mean over ranks of C(y)_i + e_i``, ``e_i ← z − C(z)``;
3. every server's ``C(z)`` is all-gathered; every rank decodes the same ``x̄ = C(z)`` (first ``N``
   entries), so the weights stay bit-identical across ranks.

Padding entries are excluded from the scales and kept at zero in both error buffers.

**Wire format**: per (tensor, chunk) a segment of ``C/8`` bytes of signs, packed 8 to a ``uint8``
(entry ``8b + k`` in bit ``k`` of byte ``b``, bit set for ``+``), followed by the chunk's fp32
scale (4 bytes, native byte order). The all-to-all sends, for each destination rank, the
segments of all tensors of the step in parameter order (one collective per step); the server's
result has the same layout and goes through one all-gather. Counted bytes
(:class:`~lowrank.distributed.comm.CommStats`, by the convention of
:mod:`lowrank.distributed.comm`: the reduced payload, of which the scatter and the gather each
send ``(w − 1)/w`` per rank): per tensor ``N'/8 + 4w`` (``signs`` + ``scales``), about 1/32 of
fp32's ``4N`` plus ``4w``. With ``w = 1`` nothing is sent and the momentum is not compressed.

**Differences from DeepSpeed's** ``OnebitAdam`` (the authors' code): the scale is the ℓ1 mean
(their code uses ``‖x‖₂/sqrt(numel)``); the worker has one scale per chunk rather than one per
tensor; it runs on gloo (CPU) and NCCL through ``torch.distributed`` collectives (theirs needs
CuPy/NCCL or MPI on GPUs); bias correction as AdamW (theirs has none); the error buffers are
ordinary state, saved by ``state_dict()`` (tensors and ints: ``torch.load(weights_only=True)``
works) and restored, so a resume is bit-identical (theirs resets them on load). Each rank's
error buffers are its own: save ``optimizer.state_dict()`` on every rank.

**With ProjectedAdamW's options** (accepted by name in groups, so a method's optimizer groups
can be passed as they are): weight decay, per-group ``lr`` (schedulers) and ``betas``/``eps``
compose. Momentum resets compose and **restart the warm-up** of the parameters reset
(:meth:`OneBitAdam.reset_momentum`, ``reset_interval``; the frozen ``v`` is zeroed with ``m``,
so it must be re-estimated from averaged gradients before it can be frozen again; the error
buffers are zeroed as they refer to the old coordinates); ``reset_warmup`` (SPAM's post-reset
ramp) composes. Refused with a one-line ``ValueError``: ``projection`` (GaLore/APOLLO: use
:class:`~lowrank.optim.ProjectedAdamW` with ``--comm projected``), ``density < 1`` (sparse
momentum: the compressor cannot send the zeros outside the subset), ``spike_threshold`` (SPAM's
clip compares the averaged gradient with ``v``; after the freeze each rank has only its local
gradient), ``adaptive_clip`` / ``norm_scaling`` (Stable-SPAM: statistics of the averaged
gradient), ``state_bits`` and a ``state_dtype`` other than fp32 (error feedback needs fp32; the
state is fp32 whatever the parameter's dtype), and ``reset_interval ≤ freeze_step`` (the warm-up
would never end). Options that only act with those (``rank``, ``update_proj_gap``, ``scale``,
``gammas``, ...) are inert, as in ProjectedAdamW; ``seed`` and ``foreach`` are ignored.

**Integration**::

    optimizer = OneBitAdam(param_groups(model, method), lr=..., freeze_step=..., weight_decay=...)
    ddp = wrap_ddp(model, info, device)
    stats = register_comm_hook(ddp, "onebit", optimizer=optimizer)   # = optimizer.comm_stats
    # each step: backward (DDP averages only warm-up parameters), optimizer.step() (sends m), log stats.record()

DDP still broadcasts the weights at construction and averages the gradients of parameters in
their warm-up. After the warm-up ``p.grad`` is the rank's local gradient: a gradient-norm clip
clips each rank's own contribution, and a decision to skip a step must be agreed by all ranks
(e.g. all-reduce the norm with ``MAX``), since ``step()`` is a collective.
"""

import functools
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch.optim import Optimizer

from ..optim import OPTION_DEFAULTS
from ..optim.adamw import validate_group
from ..optim.spikes import reset_warmup_factor
from .comm import CommStats, full_piece, reduce_pieces

__all__ = [
    "OneBitAdam",
    "compressed_allreduce",
    "compress_chunks",
    "onebit_hook",
    "pack_signs",
    "padded_numel",
    "scaled_sign",
    "server_reduce",
    "unpack_signs",
    "worker_compress",
]

_SCALE_BYTES = 4  # one fp32 per chunk
# Keys a parameter group may carry that are not options (torch's schedulers, lowrank's group names).
_BOOKKEEPING = frozenset({"params", "param_names", "group_name", "name", "base_lr", "initial_lr"})


@functools.cache
def _bit_weights(device: torch.device) -> torch.Tensor:
    """``1, 2, 4, ..., 128``: bit ``k`` of a byte holds entry ``k``."""
    return torch.tensor([1 << k for k in range(8)], dtype=torch.uint8, device=device)


# ---------------------------------------------------------------------- the compressor, pure functions


def padded_numel(numel: int, world_size: int) -> int:
    """``N' = ceil(N / 8w) · 8w``: ``w`` chunks of whole bytes of signs."""
    block = 8 * world_size
    return -(-numel // block) * block


def _chunk_counts(numel: int, world_size: int) -> list[int]:
    """Real (unpadded) entries in each of the ``w`` chunks."""
    chunk = padded_numel(numel, world_size) // world_size
    return [min(chunk, max(0, numel - i * chunk)) for i in range(world_size)]


def pack_signs(x: torch.Tensor) -> torch.Tensor:
    """``sign(x)`` at 1 bit per entry (bit set for ``x ≥ 0``), 8 to a ``uint8``, along the last dim
    (a multiple of 8)."""
    bits = (x >= 0).to(torch.uint8).unflatten(-1, (-1, 8))
    return (bits * _bit_weights(x.device)).sum(-1, dtype=torch.uint8)


def unpack_signs(packed: torch.Tensor) -> torch.Tensor:
    """The ``±1`` fp32 signs of :func:`pack_signs`' bytes (8 per byte, last dim)."""
    bits = packed.unsqueeze(-1).bitwise_and(_bit_weights(packed.device)).ne(0)
    return bits.flatten(-2).float().mul_(2).sub_(1)


def compress_chunks(rows: torch.Tensor, counts: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``C`` of each row of ``rows`` (``k × C`` fp32; row ``j`` has ``counts[j]`` real entries, the
    rest zeros): ``(packed signs k × C/8, scales k, decoded k × C)``, ``scale = ‖row‖₁ / count``."""
    real = torch.tensor(counts, dtype=rows.dtype, device=rows.device).clamp_min(1)
    scales = rows.abs().sum(1).div_(real)
    packed = pack_signs(rows)
    return packed, scales, unpack_signs(packed).mul_(scales.unsqueeze(1))


def scaled_sign(x: torch.Tensor) -> torch.Tensor:
    """``C(x) = ‖x‖₁/numel · sign(x)`` over the whole of ``x`` (``sign(0) = +1``), for reference."""
    return torch.where(x >= 0, 1.0, -1.0).mul_(x.abs().sum() / x.numel())


def worker_compress(x: torch.Tensor, error: torch.Tensor, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 1 for one tensor ``x`` (``N`` entries): ``y = x + e``, ``e ← y − C(y)`` in place on
    ``error`` (``N'``); returns ``C(y)`` as ``(packed signs w × C/8, scales w)``, row ``i`` for server ``i``."""
    numel = x.numel()
    y = error.clone()
    y[:numel].add_(x.reshape(-1))
    packed, scales, decoded = compress_chunks(y.view(world_size, -1), _chunk_counts(numel, world_size))
    torch.sub(y, decoded.view(-1), out=error)
    error[numel:] = 0
    return packed, scales


def server_reduce(packed: torch.Tensor, scales: torch.Tensor, error: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 2 for one chunk: the ``w`` ranks' ``C(y)_i`` (``packed`` ``w × C/8``, ``scales`` ``w``),
    ``z = mean + e_i``, ``e_i ← z − C(z)`` in place on ``error`` (``C``); returns ``C(z)`` as
    ``(packed 1 × C/8, scale 1)``. ``count``: the chunk's real entries."""
    z = unpack_signs(packed).mul_(scales.unsqueeze(1)).mean(0)
    z[count:] = 0
    z.add_(error)
    out_packed, out_scale, decoded = compress_chunks(z.unsqueeze(0), [count])
    torch.sub(z, decoded.view(-1), out=error)
    error[count:] = 0
    return out_packed, out_scale


def _segments(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Rows of ``[signs | fp32 scale as 4 bytes]``, the wire format."""
    return torch.cat([packed, scales.contiguous().view(torch.uint8).view(-1, _SCALE_BYTES)], dim=1)


def _split(segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return segments[:, :-_SCALE_BYTES], segments[:, -_SCALE_BYTES:].contiguous().view(torch.float32).view(-1)


def compressed_allreduce(
    tensors: list[torch.Tensor],
    worker_errors: list[torch.Tensor],
    server_errors: list[torch.Tensor],
    group: dist.ProcessGroup | None = None,
) -> dict[str, int]:
    """Replace each of ``tensors`` (fp32) by the 1-bit compressed mean over the ranks (module
    docstring), with one all-to-all and one all-gather for all of them; returns the counted bytes
    ``{"signs": Σ N'/8, "scales": Σ 4w}``."""
    group = group or dist.group.WORLD
    world, rank = group.size(), group.rank()
    send = torch.cat([_segments(*worker_compress(x, e, world)) for x, e in zip(tensors, worker_errors)], dim=1)
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=group)  # row j of send goes to rank j
    results, offset = [], 0
    for x, e in zip(tensors, server_errors):
        width = e.numel() // 8 + _SCALE_BYTES
        packed, scales = _split(received[:, offset : offset + width])
        results.append(_segments(*server_reduce(packed, scales, e, _chunk_counts(x.numel(), world)[rank])))
        offset += width
    mine = torch.cat(results, dim=1).view(-1)
    gathered = torch.empty(world * mine.numel(), dtype=torch.uint8, device=mine.device)
    dist.all_gather_single(gathered, mine, group=group)
    gathered = gathered.view(world, -1)  # row j: server j's chunks
    offset = 0
    for x, e in zip(tensors, server_errors):
        width = e.numel() // 8 + _SCALE_BYTES
        packed, scales = _split(gathered[:, offset : offset + width])
        x.copy_(unpack_signs(packed).mul_(scales.unsqueeze(1)).view(-1)[: x.numel()].view_as(x))
        offset += width
    return onebit_bytes([x.numel() for x in tensors], world)


def onebit_bytes(numels: list[int], world: int) -> dict[str, int]:
    """What :func:`compressed_allreduce` hands to its collectives for tensors of ``numels``
    entries at ``world`` ranks: packed signs (``padded_numel/8``) and one fp32 scale per chunk."""
    return {"signs": sum(padded_numel(n, world) // 8 for n in numels), "scales": _SCALE_BYTES * world * len(numels)}


# ---------------------------------------------------------------------- the optimizer

# ProjectedAdamW options 1-bit Adam cannot serve: (is it set?, why not).
_REFUSED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "projection": (lambda v: v is not None, "1-bit Adam compresses the full-size momentum; for GaLore-style methods "
                   "use ProjectedAdamW with --comm projected"),
    "density": (lambda v: v < 1.0, "sparse momentum: the 1-bit compressor has no zero, so it cannot send the entries "
                "outside the subset"),
    "spike_threshold": (lambda v: v > 0, "SPAM's clip compares the averaged gradient with v, and after the warm-up "
                        "each rank has only its local gradient"),
    "adaptive_clip": (bool, "Stable-SPAM's clipping needs statistics of the averaged gradient, which the ranks no "
                      "longer receive after the warm-up"),
    "norm_scaling": (bool, "Stable-SPAM's norm scaling needs statistics of the averaged gradient, which the ranks "
                     "no longer receive after the warm-up"),
    "state_bits": (lambda v: v is not None, "error feedback needs fp32 moments and buffers"),
    "state_dtype": (lambda v: v not in (None, torch.float32), "error feedback needs fp32 moments and buffers"),
}
_ADAM_KEYS = ("lr", "betas", "eps", "weight_decay")


class OneBitAdam(Optimizer):
    r"""1-bit Adam (Tang et al. 2021): AdamW for ``freeze_step`` warm-up steps, then a frozen
    ``v`` and a momentum all-reduced at 1 bit per entry with worker and server error feedback.

    The algorithm, wire format, byte count and which ProjectedAdamW options compose are in the
    module docstring (:mod:`lowrank.distributed.onebit`). Use it with DDP and
    ``register_comm_hook(ddp, "onebit", optimizer=this)``, which stops DDP from averaging the
    gradients of parameters past their warm-up; ``step()`` is then a collective of every rank.

    State per parameter (fp32 tensors and ints; ``state_dict()`` loads with ``weights_only=True``
    and a resume is bit-identical): ``step`` (since the start or the last reset), ``total_step``,
    ``resets``; ``exp_avg``, ``exp_avg_sq`` shaped like ``p``; after the warm-up on several ranks,
    ``worker_error`` (``N'``) and ``server_error`` (``N'/w``). Error buffers are per rank. Memory:
    AdamW's ``2N`` fp32 plus ``(1 + 1/w)·N'`` fp32 for the buffers.

    Args:
        params: parameters or parameter-group dicts (groups may set ``freeze_step`` and the
            options in the module docstring).
        lr, betas, eps, weight_decay: AdamW's (decoupled weight decay).
        freeze_step: warm-up steps of uncompressed AdamW before ``v`` is frozen (the paper
            freezes after ~15–25% of training; DeepSpeed's docs say the same). At least 1.
        process_group: the ranks that average (default: the world).
        **options: ProjectedAdamW's group options, checked as above.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        freeze_step: int,
        process_group: dist.ProcessGroup | None = None,
        **options: Any,
    ) -> None:
        unknown = sorted(set(options) - set(OPTION_DEFAULTS))
        if unknown:
            raise TypeError(f"OneBitAdam got unexpected option(s) {unknown}; known: {sorted(OPTION_DEFAULTS)}")
        self.process_group = process_group
        self._groups: dict[int, dict[str, Any]] = {}
        defaults = {**OPTION_DEFAULTS, **options, "lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                    "freeze_step": freeze_step}
        super().__init__(params, defaults)
        self.comm_stats = CommStats("onebit", self.world_size)

    @property
    def world_size(self) -> int:
        if not dist.is_initialized():
            return 1
        return (self.process_group or dist.group.WORLD).size()

    # ------------------------------------------------------------------ validation

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        where = f"param_groups[{len(self.param_groups)}]"
        unknown = sorted(set(param_group) - set(self.defaults) - _BOOKKEEPING)
        if unknown:
            raise ValueError(f"{where}: unknown option {unknown[0]!r}; known: {', '.join(sorted(self.defaults))}")
        group = {**self.defaults, **param_group}
        validate_group({key: group[key] for key in (*_ADAM_KEYS, *OPTION_DEFAULTS)}, where)
        freeze = group["freeze_step"]
        if isinstance(freeze, bool) or not isinstance(freeze, int) or freeze < 1:
            raise ValueError(f"{where}: freeze_step must be an integer >= 1 (warm-up steps before v is frozen), got {freeze!r}")
        for key, (is_set, why) in _REFUSED.items():
            if is_set(group[key]):
                raise ValueError(f"{where}: OneBitAdam cannot serve {key}={group[key]!r}: {why}")
        if 0 < group["reset_interval"] <= freeze:
            raise ValueError(f"{where}: reset_interval {group['reset_interval']} <= freeze_step {freeze}: each reset "
                             "restarts 1-bit Adam's warm-up, which would never end; lower freeze_step")
        super().add_param_group(param_group)
        for p in self.param_groups[-1]["params"]:
            self._groups[id(p)] = self.param_groups[-1]

    # ------------------------------------------------------------------ public helpers

    def in_warmup(self, p: torch.Tensor) -> bool:
        """Whether ``p``'s next step is a warm-up step, whose gradient DDP must average (also for a
        parameter this optimizer does not hold, which it never steps)."""
        group, state = self._groups.get(id(p)), self.state.get(p)
        if group is None or not state:
            return True
        step = 0 if self._reset_due(group, state) else state["step"]
        return step < group["freeze_step"]

    @torch.no_grad()
    def reset_momentum(self, params: Iterable[torch.Tensor] | None = None) -> None:
        """Zero ``m``, ``v`` and the error buffers of ``params`` (default: all) and restart their
        bias correction and their warm-up. Every rank must reset the same parameters."""
        targets = [p for g in self.param_groups for p in g["params"]] if params is None else list(params)
        for p in targets:
            if id(p) not in self._groups:
                raise ValueError(f"reset_momentum: a parameter of shape {tuple(p.shape)} is not in this optimizer")
            if self.state.get(p):
                self._reset(self.state[p])

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """``Optimizer.load_state_dict``, keeping the state in fp32 (torch would cast it to each
        parameter's dtype, rounding the moments and error buffers of a bf16 parameter)."""
        super().load_state_dict(state_dict)
        saved = [state_dict["state"].get(i, {}) for g in state_dict["param_groups"] for i in g["params"]]
        for p, entries in zip((p for g in self.param_groups for p in g["params"]), saved):
            self.state[p].update({k: v.to(p.device, copy=True) for k, v in entries.items() if torch.is_tensor(v)})

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        with torch.enable_grad():
            loss = closure() if closure is not None else None
        world = self.world_size
        frozen: list[tuple[torch.Tensor, dict[str, Any], dict[str, Any]]] = []
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self._prepare(p, group)
                state["step"] += 1
                state["total_step"] += 1
                grad = p.grad.float()
                if group["weight_decay"] != 0:
                    p.mul_(1.0 - group["lr"] * group["weight_decay"])
                state["exp_avg"].lerp_(grad, 1.0 - beta1)
                if state["step"] <= group["freeze_step"]:
                    state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                    self._update(p, group, state, state["step"])
                else:
                    frozen.append((p, group, state))
        if frozen and world > 1:
            buffers = [self._error_buffers(p, state, world) for p, _, state in frozen]
            sent = compressed_allreduce([state["exp_avg"] for _, _, state in frozen], [b[0] for b in buffers],
                                        [b[1] for b in buffers], self.process_group)
            for what, nbytes in sent.items():
                self.comm_stats.add(nbytes, what)
        for p, group, state in frozen:
            self._update(p, group, state, group["freeze_step"])
        self.comm_stats.end_step()
        return loss

    # ------------------------------------------------------------------ internals

    @staticmethod
    def _reset_due(group: dict[str, Any], state: dict[str, Any]) -> bool:
        interval = group["reset_interval"]
        return bool(interval) and state["total_step"] > 0 and state["total_step"] % interval == 0

    @staticmethod
    def _reset(state: dict[str, Any]) -> None:
        for key in ("exp_avg", "exp_avg_sq", "worker_error", "server_error"):
            if key in state:
                state[key].zero_()
        state["step"] = 0
        state["resets"] += 1

    def _prepare(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            state.update(step=0, total_step=0, resets=0)
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
        elif self._reset_due(group, state):
            self._reset(state)
        return state

    @staticmethod
    def _error_buffers(p: torch.Tensor, state: dict[str, Any], world: int) -> tuple[torch.Tensor, torch.Tensor]:
        padded = padded_numel(p.numel(), world)
        worker = state.get("worker_error")
        if worker is not None and worker.numel() != padded:
            warnings.warn(f"OneBitAdam: error buffers saved for another world size (now {world} ranks); they restart "
                          "at zero", stacklevel=3)
            worker = None
        if worker is None:
            state["worker_error"] = torch.zeros(padded, dtype=torch.float32, device=p.device)
            state["server_error"] = torch.zeros(padded // world, dtype=torch.float32, device=p.device)
        return state["worker_error"], state["server_error"]

    @staticmethod
    def _update(p: torch.Tensor, group: dict[str, Any], state: dict[str, Any], v_step: int) -> None:
        """``p ← p − lr/(1 − β1^t) · m / (sqrt(v)/sqrt(1 − β2^s) + eps)``, torch.optim.AdamW's ops
        (``s = t`` in the warm-up, ``freeze_step`` after it), times the post-reset ramp."""
        beta1, beta2 = group["betas"]
        warm = 1.0 if state["resets"] == 0 else reset_warmup_factor(state["step"] - 1, group["reset_warmup"])
        step_size = group["lr"] / (1.0 - beta1 ** state["step"]) * warm
        denom = (state["exp_avg_sq"].sqrt() / (1.0 - beta2**v_step) ** 0.5).add_(group["eps"])
        if p.dtype == torch.float32:
            p.addcdiv_(state["exp_avg"], denom, value=-step_size)
        else:
            p.add_((state["exp_avg"] / denom).mul_(-step_size).to(p.dtype))


def onebit_hook(optimizer: OneBitAdam, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook of 1-bit Adam: average (uncompressed) the gradients of parameters in
    their warm-up, leave the others local (the optimizer all-reduces their momentum)."""
    pairs = list(zip(bucket.parameters(), bucket.gradients()))
    pieces = [full_piece(grad) for p, grad in pairs if optimizer.in_warmup(p)]
    whole = len(pieces) == len(pairs)
    group = optimizer.process_group or dist.group.WORLD
    return reduce_pieces(bucket, None if whole else pieces, group, optimizer.comm_stats, close_step=False)

