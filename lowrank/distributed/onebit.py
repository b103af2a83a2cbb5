r"""1-bit Adam: Adam whose momentum is all-reduced at 1 bit per entry after a warm-up.

Tang, Gan, Awan, Rajbhandari, Li, Lian, Liu, Zhang & He 2021, "1-bit Adam: Communication
Efficient Large-Scale Training with Adam's Convergence Speed" (ICML, arXiv 2102.02888).

**Algorithm** (:class:`OneBitAdam`, per parameter, ``t`` its step since the start or the last reset):

* warm-up, ``t ≤ freeze_step``: AdamW exactly as ``torch.optim.AdamW`` (decoupled weight decay,
  bias correction), on the gradient DDP has averaged over the ranks (uncompressed all-reduce);
* then ``v`` is frozen (``v_T``, ``T = freeze_step``, bias-corrected once: ``v̂ = v_T/(1 − β2^T)``)
  and used as a fixed preconditioner. Entries whose frozen ``v`` is 0 (their averaged gradient was
  exactly 0 through the warm-up: unseen embedding rows, structurally zero weights) are masked
  (:func:`variance_mask`, DeepSpeed's ``exp_avg_mask`` read from ``v``): their ``m`` is held at 0
  and they are left out of the compression, so they move by weight decay only, as under AdamW
  (unmasked, the sign compressor, which has no zero, would move them by ``lr·scale/eps``). Each worker updates its momentum with its *local* gradient,
  ``m ← β1 m + (1 − β1) g_local``, and the momenta are averaged by the compressed all-reduce below;
  the update is ``p ← p(1 − lr·wd) − lr/(1 − β1^t) · m / (sqrt(v̂) + eps)``. DDP's gradient
  all-reduce is off for these parameters (:func:`onebit_hook` returns the local gradient).
* what is compressed (``onebit_compress``): the paper's ``"momentum"`` compresses ``m``; ours,
  ``"update"`` (default), compresses ``u = m/d`` with ``d = sqrt(v̂) + eps`` (frozen, the same on
  every rank) and decodes ``m = d·ū``. Averaging is linear, so uncompressed both are the mean
  momentum; compressed, the sign code gives every entry of a chunk the same magnitude, and with
  ``m`` that magnitude is divided by each entry's own ``d``: an entry with a small but nonzero
  ``v`` (an embedding row of a token seen once or twice in the warm-up) moves by up to
  ``lr·scale/d`` per step, far beyond Adam's ~``lr`` (tiny model, 12 steps: an embedding entry
  at 2.5 against AdamW's 0.08). Compressing ``u`` puts the error feedback on the step itself
  (error-feedback sign compression of the update, as in EF-SignSGD), so every entry moves by
  about ``lr``.

**Compressed all-reduce** (:func:`compressed_allreduce`) of a tensor ``x`` over ``w`` ranks: ``x`` is
flattened and zero-padded to ``N' = ceil(N/8w)·8w`` entries and cut into ``w`` chunks of ``C = N'/w``;
rank ``i`` is the server of chunk ``i``. The compressor, per chunk, is
``C(x) = ‖x‖₁/numel · sign(x)`` (``onebit_scale="l1"``, the default: the scaled sign closest to
``x`` in ℓ2) or ``C(x) = ‖x‖₂/sqrt(numel) · sign(x)`` (``"l2"``: the paper's and DeepSpeed's, which
preserves the norm), ``numel`` the chunk's real, unmasked entries; ``sign(0) = +1``, the wire has
no zero.

1. worker, with its error ``e`` (``N'`` entries): ``y = x + e``, send ``C(y)`` chunk by chunk,
   ``e ← y − C(y)`` (error feedback: ``e ← x + e − C(x + e)``);
2. server ``i``, with its error ``e_i`` (``C`` entries): receive chunk ``i`` from every rank
   (all-to-all), ``z = mean over ranks of C(y)_i + e_i``, ``e_i ← z − C(z)``;
3. every server's ``C(z)`` is all-gathered; every rank decodes the same ``x̄ = C(z)`` (first ``N``
   entries), so the weights stay bit-identical across ranks.

Padding and masked entries are excluded from the scales, kept at zero in both error buffers and
decoded as 0 (:func:`kept_entries`; the mask is the same on every rank).

**Wire format**: per (tensor, chunk) a segment of ``C/8`` bytes of signs, packed 8 to a ``uint8``
(entry ``8b + k`` in bit ``k`` of byte ``b``, bit set for ``+``), followed by the chunk's fp32
scale (4 bytes, native byte order). The all-to-all sends, for each destination rank, the
segments of all tensors of the step in parameter order (one collective per step); the server's
result has the same layout and goes through one all-gather. Counted bytes
(:class:`~lowrank.distributed.comm.CommStats`, by the convention of
:mod:`lowrank.distributed.comm`: the reduced payload, of which the scatter and the gather each
send ``(w − 1)/w`` per rank): per tensor ``N'/8 + 4w`` (``signs`` + ``scales``), about 1/32 of
fp32's ``4N`` plus ``4w``. With ``w = 1`` nothing is sent and the momentum is not compressed.

**Differences from DeepSpeed's** ``OnebitAdam`` (the authors' code): the scale is the ℓ1 mean by
default (theirs, ``‖x‖₂/sqrt(numel)``, with ``onebit_scale="l2"``); the zero-variance mask is
read from ``v`` for every parameter (theirs is given by the user); the worker has one scale per chunk rather than one per
tensor; it runs on gloo (CPU) and NCCL through ``torch.distributed`` collectives (theirs needs
CuPy/NCCL or MPI on GPUs); bias correction as AdamW (theirs has none); the error buffers are
ordinary state, saved by ``state_dict()`` (tensors and ints: ``torch.load(weights_only=True)``
works) and restored, so a resume is bit-identical (theirs resets them on load). Each rank's
error buffers are its own and everything else is the same on every rank: save
:meth:`~OneBitAdam.shared_state_dict` once and each rank's :meth:`~OneBitAdam.error_state_dict`
(``lowrank pretrain`` does: ``optimizer.pt`` plus ``onebit_errors.rank<r>.pt``).

**With ProjectedAdamW's options** (accepted by name in groups, so a method's optimizer groups
can be passed as they are): weight decay, per-group ``lr`` (schedulers) and ``betas``/``eps``
compose. Momentum resets compose and **restart the warm-up** of the parameters reset
(:meth:`OneBitAdam.reset_momentum`, ``reset_interval``; the frozen ``v`` is zeroed with ``m``,
so it must be re-estimated from averaged gradients before it can be frozen again; the error
buffers are zeroed as they refer to the old coordinates). That re-warm-up lasts ``refreeze_step``
steps (default :func:`default_refreeze_step`), not ``freeze_step``: with the full warm-up, resets
closer together than ``freeze_step`` (a restart cycle of 200 steps, a freeze at 10 % of a run
over 2,000 steps) would send those parameters in fp32 forever. The per-step counts
``onebit_warmup_tensors`` / ``onebit_compressed_tensors`` are logged with the bytes, and a reset
that comes before a parameter's re-warm-up ended warns once; ``reset_warmup`` (SPAM's post-reset
ramp) composes. Refused with a one-line ``ValueError``: ``projection`` (GaLore/APOLLO: use
:class:`~lowrank.optim.ProjectedAdamW` with ``--comm projected``), ``density < 1`` (sparse
momentum: the compressor cannot send the zeros outside the subset), ``spike_threshold`` (SPAM's
clip compares the averaged gradient with ``v``; after the freeze each rank has only its local
gradient), ``adaptive_clip`` / ``norm_scaling`` (Stable-SPAM: statistics of the averaged
gradient), ``state_bits`` and a ``state_dtype`` other than fp32 (error feedback needs fp32; the
state is fp32 whatever the parameter's dtype), and ``reset_interval`` not above the re-warm-up
(the warm-up would never end). Options that only act with those (``rank``, ``update_proj_gap``, ``scale``,
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

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch.optim import Optimizer

from ..optim import OPTION_DEFAULTS, validate_group
from ..optim.spikes import reset_warmup_factor
from .signs import (  # noqa: F401 - re-exported: 1-bit Adam's compressor
    SCALE_DEFAULT,
    SCALES,
    compress_chunks,
    compressed_allreduce,
    kept_entries,
    onebit_bytes,
    pack_signs,
    padded_numel,
    scaled_sign,
    server_reduce,
    unpack_signs,
    worker_compress,
)
from .wire import CommStats, full_piece, reduce_pieces

__all__ = [
    "OneBitAdam",
    "compressed_allreduce",
    "compress_chunks",
    "default_refreeze_step",
    "kept_entries",
    "onebit_hook",
    "pack_signs",
    "padded_numel",
    "scaled_sign",
    "server_reduce",
    "unpack_signs",
    "variance_mask",
    "worker_compress",
]

# What travels after the freeze: the preconditioned momentum m/d (ours) or the momentum m (the paper's).
COMPRESSED = ("update", "momentum")
COMPRESS_DEFAULT = "update"
# Keys a parameter group may carry that are not options (torch's schedulers, lowrank's group names).
_BOOKKEEPING = frozenset({"params", "param_names", "group_name", "name", "base_lr", "initial_lr"})


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
MIN_REFREEZE = 16  # the shortest default re-warm-up (default_refreeze_step)
_ERROR_KEYS = ("worker_error", "server_error")  # per rank; everything else is the same on every rank


def default_refreeze_step(freeze_step: int) -> int:
    """The warm-up after a momentum reset when ``refreeze_step`` is not given: a tenth of the first,
    at least :data:`MIN_REFREEZE` steps, at most the first.

    The first warm-up waits for ``v`` to settle from the start of training; after a reset the
    gradients' scale is known and ``v`` (bias-corrected: the mean of the squared gradients seen so
    far) needs only enough steps to average out one step's noise (from a single step, an entry whose
    gradient happened to be small gets a tiny ``v`` and, frozen, huge steps). A short re-warm-up
    lets the parameters compress again between resets: a reset every 200 steps with the full
    warm-up of 10 % of the run would leave them in fp32 for good in any run of 2,000 steps or more."""
    return min(freeze_step, max(MIN_REFREEZE, freeze_step // 10))


def warmup_steps(group: dict[str, Any], resets: int) -> int:
    """Steps of uncompressed AdamW before ``v`` is frozen: ``freeze_step`` from the start,
    ``refreeze_step`` after a momentum reset."""
    if resets == 0:
        return group["freeze_step"]
    refreeze = group["refreeze_step"]
    return min(group["freeze_step"], refreeze if refreeze is not None else default_refreeze_step(group["freeze_step"]))


def refreeze_steps(group: dict[str, Any]) -> tuple[int, int]:
    return warmup_steps(group, 0), warmup_steps(group, 1)


def freeze_step_text(group: dict[str, Any]) -> str:
    first, again = refreeze_steps(group)
    return f"freeze_step {first}, {again} after a reset"


def variance_mask(exp_avg_sq: torch.Tensor) -> torch.Tensor:
    """The entries 1-bit Adam may move after the freeze: those whose frozen ``v`` is not 0.

    An entry whose averaged gradient was exactly 0 through the warm-up (an embedding row of a token
    not seen yet, a structurally zero weight) has ``v = 0``; the sign compressor has no zero, so its
    decoded momentum would be ``±scale`` and its update ``lr·scale/eps``. DeepSpeed masks such entries
    with a user-given ``exp_avg_mask``; here the mask is read from ``v`` itself, for every parameter,
    and is the same on every rank (``v`` comes from averaged gradients). A masked entry keeps
    ``m = 0`` and moves only by weight decay, as AdamW leaves an entry that never has a gradient;
    one whose gradient appears only after the freeze stays frozen too until the next reset."""
    return exp_avg_sq > 0


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
        refreeze_step: the warm-up after a momentum reset, which zeroes ``v``: steps of
            uncompressed AdamW that re-estimate it before it is frozen again (default
            :func:`default_refreeze_step`: a tenth of ``freeze_step``, at least 16, at most ``freeze_step``).
        onebit_scale: the compressor's scale, ``"l1"`` (default, ours) or ``"l2"`` (the paper's).
        onebit_compress: what is compressed, ``"update"`` (default, ours: ``m/d``) or ``"momentum"``
            (the paper's: ``m``); module docstring.
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
        refreeze_step: int | None = None,
        onebit_scale: str = SCALE_DEFAULT,
        onebit_compress: str = COMPRESS_DEFAULT,
        process_group: dist.ProcessGroup | None = None,
        **options: Any,
    ) -> None:
        unknown = sorted(set(options) - set(OPTION_DEFAULTS))
        if unknown:
            raise TypeError(f"OneBitAdam got unexpected option(s) {unknown}; known: {sorted(OPTION_DEFAULTS)}")
        self.process_group = process_group
        self._groups: dict[int, dict[str, Any]] = {}
        self._warned_uncompressed = False
        defaults = {**OPTION_DEFAULTS, **options, "lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                    "freeze_step": freeze_step, "refreeze_step": refreeze_step, "onebit_scale": onebit_scale,
                    "onebit_compress": onebit_compress}
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
        refreeze = group["refreeze_step"]
        if refreeze is not None and (isinstance(refreeze, bool) or not isinstance(refreeze, int) or refreeze < 1):
            raise ValueError(f"{where}: refreeze_step must be an integer >= 1 (warm-up steps after a momentum reset) or "
                             f"None, got {refreeze!r}")
        if group["onebit_scale"] not in SCALES:
            raise ValueError(f"{where}: onebit_scale must be one of {', '.join(SCALES)}, got {group['onebit_scale']!r}")
        if group["onebit_compress"] not in COMPRESSED:
            raise ValueError(f"{where}: onebit_compress must be one of {', '.join(COMPRESSED)}, got "
                             f"{group['onebit_compress']!r}")
        for key, (is_set, why) in _REFUSED.items():
            if is_set(group[key]):
                raise ValueError(f"{where}: OneBitAdam cannot serve {key}={group[key]!r}: {why}")
        if 0 < group["reset_interval"] <= min(refreeze_steps(group)):
            raise ValueError(f"{where}: reset_interval {group['reset_interval']} <= the warm-up ({freeze_step_text(group)}): "
                             "each reset restarts 1-bit Adam's warm-up, which would never end; lower freeze_step / "
                             "refreeze_step")
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
        if self._reset_due(group, state):
            return True
        return state["step"] < warmup_steps(group, state["resets"])

    @torch.no_grad()
    def reset_momentum(self, params: Iterable[torch.Tensor] | None = None) -> None:
        """Zero ``m``, ``v`` and the error buffers of ``params`` (default: all) and restart their
        bias correction and their warm-up. Every rank must reset the same parameters."""
        targets = [p for g in self.param_groups for p in g["params"]] if params is None else list(params)
        for p in targets:
            if id(p) not in self._groups:
                raise ValueError(f"reset_momentum: a parameter of shape {tuple(p.shape)} is not in this optimizer")
            if self.state.get(p):
                self._reset(self._groups[id(p)], self.state[p])

    def shared_state_dict(self) -> dict[str, Any]:
        """``state_dict()`` without the error buffers: the part every rank holds alike (the moments
        are the decoded all-reduce's, the same bits everywhere), saved once for all ranks."""
        full = self.state_dict()
        state = {i: {k: v for k, v in entries.items() if k not in _ERROR_KEYS} for i, entries in full["state"].items()}
        return {**full, "state": state}

    def error_state_dict(self) -> dict[int, dict[str, torch.Tensor]]:
        """This rank's error buffers by parameter index (``state_dict()``'s numbering): its own shard."""
        full = self.state_dict()["state"]
        return {i: {k: v for k, v in entries.items() if k in _ERROR_KEYS} for i, entries in full.items()
                if any(k in entries for k in _ERROR_KEYS)}

    def load_error_state_dict(self, errors: dict[int, dict[str, torch.Tensor]]) -> None:
        """Put this rank's error buffers (:meth:`error_state_dict`) back, after ``load_state_dict`` of
        the shared state."""
        params = [p for g in self.param_groups for p in g["params"]]
        for index, entries in errors.items():
            p = params[int(index)]
            self.state[p].update({k: v.to(p.device, dtype=torch.float32, copy=True) for k, v in entries.items()})

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
        frozen: list[tuple[torch.Tensor, dict[str, Any], dict[str, Any], torch.Tensor]] = []
        warming = 0
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
                if state["step"] <= warmup_steps(group, state["resets"]):
                    state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                    self._update(p, group, state, state["step"])
                    warming += 1
                else:
                    frozen.append((p, group, state, variance_mask(state["exp_avg_sq"])))
        for _, _, state, mask in frozen:
            state["exp_avg"].mul_(mask)  # entries with a frozen v of 0 keep m = 0: they would move by lr·m/eps
        for scale in SCALES:
            batch = [item for item in frozen if item[1]["onebit_scale"] == scale]
            if batch and world > 1:
                buffers = [self._error_buffers(p, state, world) for p, _, state, _ in batch]
                # "update": compress m / d, d = sqrt(v̂) + eps (the same on every rank), and decode m = d·that
                denoms = [self._denom(group, state) if group["onebit_compress"] == "update" else None
                          for _, group, state, _ in batch]
                sent_tensors = [state["exp_avg"] if d is None else state["exp_avg"] / d
                                for (_, _, state, _), d in zip(batch, denoms)]
                sent = compressed_allreduce(sent_tensors, [b[0] for b in buffers], [b[1] for b in buffers],
                                            self.process_group, masks=[mask for *_, mask in batch], scale=scale)
                for (_, _, state, _), d, x in zip(batch, denoms, sent_tensors):
                    if d is not None:
                        torch.mul(x, d, out=state["exp_avg"])
                for what, nbytes in sent.items():
                    self.comm_stats.add(nbytes, what)
        for p, group, state, _ in frozen:
            self._update(p, group, state, warmup_steps(group, state["resets"]))
        self.comm_stats.note("onebit_warmup_tensors", warming)
        self.comm_stats.note("onebit_compressed_tensors", len(frozen))
        self.comm_stats.end_step()
        return loss

    # ------------------------------------------------------------------ internals

    @staticmethod
    def _reset_due(group: dict[str, Any], state: dict[str, Any]) -> bool:
        interval = group["reset_interval"]
        return bool(interval) and state["total_step"] > 0 and state["total_step"] % interval == 0

    def _reset(self, group: dict[str, Any], state: dict[str, Any]) -> None:
        if state["step"] <= warmup_steps(group, state["resets"]) and not self._warned_uncompressed:
            self._warned_uncompressed = True
            warnings.warn(f"OneBitAdam: momentum reset after {state['step']} steps, within the warm-up "
                          f"({freeze_step_text(group)}): these parameters were sent in fp32 since their last reset; "
                          "resets further apart or a shorter refreeze_step let them compress", stacklevel=3)
        for key in ("exp_avg", "exp_avg_sq", *_ERROR_KEYS):
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
            self._reset(group, state)
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
    def _denom(group: dict[str, Any], state: dict[str, Any], v_step: int | None = None) -> torch.Tensor:
        """``sqrt(v)/sqrt(1 − β2^s) + eps``, ``s = v_step`` (default: the warm-up's length, the frozen ``v``)."""
        v_step = warmup_steps(group, state["resets"]) if v_step is None else v_step
        return (state["exp_avg_sq"].sqrt() / (1.0 - group["betas"][1] ** v_step) ** 0.5).add_(group["eps"])

    @staticmethod
    def _update(p: torch.Tensor, group: dict[str, Any], state: dict[str, Any], v_step: int) -> None:
        """``p ← p − lr/(1 − β1^t) · m / (sqrt(v)/sqrt(1 − β2^s) + eps)``, torch.optim.AdamW's ops
        (``s = t`` in the warm-up, the warm-up's length after it), times the post-reset ramp."""
        beta1 = group["betas"][0]
        warm = 1.0 if state["resets"] == 0 else reset_warmup_factor(state["step"] - 1, group["reset_warmup"])
        step_size = group["lr"] / (1.0 - beta1 ** state["step"]) * warm
        denom = OneBitAdam._denom(group, state, v_step)
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

