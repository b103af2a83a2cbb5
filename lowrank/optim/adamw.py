"""ProjectedAdamW: AdamW with gradient projection, sparse momentum, spike handling, resets and
8-/4-bit moments."""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.optim import Optimizer

from . import lowbit
from . import projection as proj
from . import spikes
from .layout import ABSMAX_KEYS, MOMENT_KEYS, MOMENT_SIGNED, shard_range, state_layout

# Keys a parameter group may carry besides the options: its parameters, a label, what LR
# schedulers and the restart controller add, and lowrank.optim.Muon's flag for the AdamW groups it
# steps with this optimizer.
_GROUP_BOOKKEEPING = frozenset({"params", "param_names", "group_name", "name", "base_lr", "initial_lr", "use_muon"})
from ..seeding import STREAM_SUBSET, sample_subset, subset_size

PROJECTIONS = (None, "svd", "randomized", "random")
RESIDUALS = (None, "fira")
SCALE_TYPES = ("channel", "tensor")

# AdamW's own hyper-parameters (torch.optim.AdamW's defaults but weight decay 0, as the papers train).
ADAM_DEFAULTS: dict[str, Any] = {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}

# Every option a parameter group may set, with its default. ``lr``, ``betas``, ``eps`` and
# ``weight_decay`` are added by the constructor.
OPTION_DEFAULTS: dict[str, Any] = {
    "projection": None,
    "rank": 128,
    "update_proj_gap": 200,
    "scale": 1.0,
    "scale_type": "channel",
    "oversample": 8,
    "power_iters": 2,
    "residual": None,
    "reset_interval": 0,
    "reset_warmup": 0,
    "density": 1.0,
    "spike_threshold": 0.0,
    "spike_skip_steps": 20,
    "adaptive_clip": False,
    "norm_scaling": False,
    "gammas": (0.7, 0.9, 0.999),
    "seed": 0,
    "state_dtype": None,
    "state_bits": None,
    "foreach": None,
}

# The multi-tensor path allocates temporaries (denominators, casts) as large as the tensors it is
# given; feeding it whole parameter groups would add ~14 bytes per parameter at peak for bf16
# weights with fp32 moments (90 GB at 7B). Chunks of at most this many elements bound that.
_FOREACH_CHUNK_NUMEL = 1 << 25


def _chunks(params: list[torch.Tensor], max_numel: int) -> Iterable[list[torch.Tensor]]:
    """Consecutive runs of ``params`` holding at most ``max_numel`` elements (a larger tensor
    forms a run of its own)."""
    chunk: list[torch.Tensor] = []
    size = 0
    for p in params:
        if chunk and size + p.numel() > max_numel:
            yield chunk
            chunk, size = [], 0
        chunk.append(p)
        size += p.numel()
    if chunk:
        yield chunk


@dataclass(frozen=True)
class StateBytes:
    """Bytes of optimizer state.

    ``total`` and ``per_group`` count every tensor in ``optimizer.state`` (exactly what
    ``state_dict()`` saves; the few Python int counters per parameter are not counted).
    ``subset_cache`` is memory held outside the state: the sorted indices of the current
    sparse-momentum subsets (4 bytes per kept entry), rebuilt from the seed when needed.
    """

    total: int
    per_group: list[int]
    subset_cache: int


def _tensor_bytes(t: torch.Tensor) -> int:
    t = _local(t)  # a DTensor's bytes on this rank
    return t.numel() * t.element_size()


class ProjectedAdamW(Optimizer):
    r"""AdamW with optional gradient projection, sparse momentum, spike handling and momentum resets.

    The core is decoupled-weight-decay Adam with bias correction, exactly as ``torch.optim.AdamW``
    (``p ← p·(1 − lr·wd) − lr · m̂ / (sqrt(v̂) + eps)``); with every option off the two agree to
    rounding. Each option below is a parameter-group key, so different parameters can use
    different methods. For one parameter with gradient ``G`` a step does, in order:

    1. **Scheduled reset** (``reset_interval`` T > 0): after every T steps of this parameter, zero
       both moments and restart bias correction, as :meth:`reset_momentum` does.
    2. **Stable-SPAM** (arXiv 2502.17055), on ``G``: ``adaptive_clip`` rescales entries above a
       bias-corrected EMA of ``max|G|`` (decay ``gammas[2]``); ``norm_scaling`` sets
       ``G ← G/‖G‖ · m̂/(sqrt(v̂)+eps)`` from EMAs of ``‖G‖`` and ``‖G‖²`` (``gammas[0]``,
       ``gammas[1]``). Their statistics are not reset by momentum resets (they describe the
       gradient, not Adam's moments). Unlike the reference, the reset happens before the step's
       gradient enters the moments, so it is never lost.
    3. **Projection** (2-D parameters only; others use plain Adam). Every ``update_proj_gap``
       steps a basis ``P`` of ``rank`` columns is recomputed on the smaller side of ``G`` and Adam
       runs on ``R = PᵀG`` (or ``GP``):

       * ``"svd"`` — GaLore (arXiv 2403.03507): top-r singular vectors; update
         ``scale · P·Adam(R)``.
       * ``"randomized"`` — same, with a randomized range finder (``oversample`` extra vectors,
         ``power_iters`` power iterations) instead of the full SVD: same subspace to ~1e-5 in
         captured energy, tens of times cheaper.
       * ``"random"`` — APOLLO (arXiv 2412.05270): seeded Gaussian ``P`` with ``N(0, 1/r)``
         entries; the update is the raw gradient scaled per channel by ``‖Adam(R)_j‖/‖R_j‖``
         (``scale_type="tensor"``: one factor, APOLLO-Mini), passed through the norm-growth
         limiter, times ``scale``. APOLLO multiplies by ``sqrt(scale)``; here ``scale`` means the
         same thing in every mode, so APOLLO's ``scale=S`` is ``scale=sqrt(S)`` here.

       ``residual="fira"`` (Fira, arXiv 2410.01623; needs ``"svd"`` or ``"randomized"``) adds the
       true orthogonal complement ``G − P PᵀG``, scaled per channel by ``‖Adam(R)_j‖/‖R_j‖`` and
       limited so its norm grows at most 1.01× per step. It is not multiplied by ``scale``, as in
       Fira; unlike Fira's code, ``scale`` never leaks into the residual.
    4. **Sparse momentum** (``density`` d < 1, 2-D parameters, SPAM arXiv 2501.06842): moments
       are kept for ``k = round(d·numel)`` entries (of ``R`` when projected) drawn uniformly from
       ``(seed, parameter index, period)``; other entries get no Adam update in that period. A
       reset starts a new period and draws a new subset. Weight decay still applies to every
       entry. Not combinable with ``"random"`` projection or a residual, whose per-channel norms
       would be computed from a mostly-empty ``Adam(R)``.
    5. **Spike clipping** (``spike_threshold`` θ > 0, SPAM): where ``g² > θ·v_{t-1}`` set
       ``g ← sign(g)·sqrt(θ·v_{t-1})``, on what enters the moments (``R``, or the kept entries).
       Skipped for the first ``spike_skip_steps`` steps after the start and after each reset.
    6. **Adam** on what is left, then the update is multiplied by the **reset warm-up** factor
       (``reset_warmup`` W > 0: from 0.01 at a reset along a cosine to 1 after W steps; there is
       no warm-up at the start of training, the LR schedule does that).

    **Low-bit moments** (``state_bits`` 8 or 4; ``None``, the default, keeps them in
    ``state_dtype``): block-wise dynamic quantization as in bitsandbytes' 8-bit optimizers
    (arXiv 2110.02861) and torchao's ``AdamW8bit`` / ``AdamW4bit`` (:mod:`lowrank.optim.lowbit`:
    blocks of 256 / 128 entries, one fp32 absmax per block, a signed code book for ``m``, an
    unsigned one for ``v``). It applies to whatever the moments hold in every mode: the
    parameter, the projected ``R``, the kept sparse entries, a low-rank factor. Each step
    dequantizes both moments to fp32, runs steps 5–6 on them in fp32 (the spike clip compares
    with the dequantized ``v_{t-1}``; the update uses the fp32 moments, not their rounding) and
    requantizes them, as both libraries do. Moments of fewer than 4096 entries stay in
    ``state_dtype``; a 4-bit moment whose size 128 does not divide is a ``ValueError`` when the
    group is added. Resets zero codes and scales (which dequantize to zero). Quantized
    parameters take the per-parameter path, also with ``foreach``.

    Clocks: each parameter counts its own steps. The projection refresh clock (``update_proj_gap``)
    and the reset clock (``reset_interval``) are independent, as in GaLore and SPAM; a reset does
    not recompute ``P``, and a new ``P`` does not reset the moments (GaLore keeps them too).

    Randomness (subsets, Gaussian projections, range-finder sketches) comes from a CPU generator
    seeded by ``(seed, parameter index, counter)``, where the index is the position in the
    flattened ``param_groups`` order. Every DDP rank draws the same numbers without communication
    and a run resumed from ``state_dict()`` continues bit-identically.

    State per parameter (only tensors and Python ints, so ``torch.load(weights_only=True)`` works):
    the counters ``step`` (Adam steps since the last reset), ``total_step``, ``resets`` and, with
    projection, ``projector_updates``; the tensors are stated by
    :func:`lowrank.optim.layout.state_layout` (names, shapes and dtypes, which the optimizer
    allocates from).

    **FSDP2** (parameters that are ``DTensor``\ s sharded on dim 0 over a 1-D mesh, as
    ``torch.distributed.fsdp.fully_shard`` makes them; :mod:`lowrank.distributed.fsdp`). Each
    rank steps its local rows ``G_i`` (``h = ceil(m/world)`` rows of ``G``) and keeps the state of
    those rows, the layout's shard view (``state_layout(..., shard=(rank, world))``). Per mode:

    * plain Adam, weight decay, resets, the warm-up ramp, SPAM clipping: elementwise, local, no
      communication. Moments shaped like ``p`` are DTensors sharded like ``p``.
    * Stable-SPAM: ``max|G|`` is an all-reduce MAX of the shard maxima, ``‖G‖`` the square root of
      an all-reduce SUM of the shards' ``‖G_i‖²`` (one scalar collective each per step), so the
      statistics are the whole tensor's, as on one process.
    * projection, between refreshes: right (``m ≥ n``) ``R_i = G_i P`` and ``G_i ← Adam(R)_i Pᵀ``
      are local (moments: a DTensor of ``R``'s rows); left (``m < n``) ``R = Σ_i P_iᵀ G_i`` is one
      all-reduce of ``r × n`` per step and ``R`` and its moments are replicated (plain tensors);
      projecting back, ``P_i Adam(R)``, is local.
    * projection refresh (``"svd"``, ``"randomized"``): the basis needs the whole ``G``. Each
      matrix has an owner rank (its parameter index modulo the world size); the due matrices are
      refreshed ``world`` at a time: one gather of ``G`` to its owner per matrix, the owners
      factorize their matrices concurrently, and one broadcast of ``P`` (``min(m, n) × r`` fp32)
      per matrix, as Dion's and Muon's FSDP2 code distribute orthogonalisation over owners.
      ``P`` is stored as a plain tensor, replicated: it multiplies plain local shards (a
      replicated DTensor would only add dispatch and redistribution), every rank holds the same
      bits (broadcast from one owner), and DCP saves a plain tensor under one name once and loads
      it whole at any world size. ``"random"`` (APOLLO) draws ``P`` from the seed on every rank:
      no communication.
    * Fira's residual ``G_i − P_i R`` (left) / ``G_i − R_i Pᵀ`` (right) is local; its per-channel
      factor ``‖Adam(R)_j‖/‖R_j‖`` is local too (right: rows of ``R``, each whole on its rank;
      left: columns of the replicated ``R``). The norm-growth limiter needs ``‖residual‖``: one
      scalar all-reduce. APOLLO: channel scaling local, as Fira's; APOLLO-Mini's tensor-wise
      factor on a right-projected (row-sharded) ``R`` needs two scalar all-reduces; its limiter one.
    * sparse momentum: every rank draws the global subset of the whole tensor from
      ``(seed, parameter index, period)``, as on one process, and keeps the slice that falls in its
      rows (no communication; the subset does not depend on the world size, so a run resumes on
      any number of ranks). Over a left-projected ``R`` (replicated) the whole subset is kept.
    * checkpoints: :meth:`state_dict` presents every tensor with its global shape: sharded
      DTensors for row-sharded moments, plain tensors for replicated ones, and a sparse moment
      (an uneven slice per rank) as the whole ``k``-vector, a DTensor sharded evenly (one
      all-gather per moment at save time); :meth:`load_state_dict` takes that, or a one-process
      state dict, and keeps the local part. DCP (:mod:`lowrank.distributed.dcp`) reshards it.
    * not supported: ``state_bits`` (quantization blocks would straddle shards; a ``ValueError``),
      DTensors with other placements or a multi-dimensional mesh (HSDP, tensor parallel).

    Args:
        params: parameters or parameter-group dicts; groups may set any option below.
        lr: learning rate, read from the group every step (LR schedulers work).
        betas: Adam's ``(beta1, beta2)``, each in ``[0, 1)``.
        eps: added to ``sqrt(v̂)`` (torch's placement; GaLore adds it to ``sqrt(v)``).
        weight_decay: decoupled weight decay, applied to every entry.
        **defaults: group defaults for the options (``projection=None``, ``rank=128``,
            ``update_proj_gap=200``, ``scale=1.0``, ``scale_type="channel"``, ``oversample=8``,
            ``power_iters=2``, ``residual=None``, ``reset_interval=0``, ``reset_warmup=0``,
            ``density=1.0``, ``spike_threshold=0.0``, ``spike_skip_steps=20``,
            ``adaptive_clip=False``, ``norm_scaling=False``, ``gammas=(0.7, 0.9, 0.999)``,
            ``seed=0``, ``state_dtype=None`` (the full-precision dtype of moments, projectors
            and of moments too small to quantize; ``None``: the parameter's), ``state_bits=None``
            (8 or 4: quantized moments, above), ``foreach=None``: batch plain-Adam parameters with
            ``torch._foreach_*`` kernels; ``None`` means on accelerators but not on the CPU, where
            the per-parameter loop is faster).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float,
        betas: tuple[float, float] = ADAM_DEFAULTS["betas"],
        eps: float = ADAM_DEFAULTS["eps"],
        weight_decay: float = ADAM_DEFAULTS["weight_decay"],
        **defaults: Any,
    ) -> None:
        unknown = sorted(set(defaults) - set(OPTION_DEFAULTS))
        if unknown:
            raise TypeError(f"ProjectedAdamW got unexpected option(s) {unknown}; known: {sorted(OPTION_DEFAULTS)}")
        self._subsets: dict[torch.Tensor, tuple[int, torch.Tensor]] = {}
        self._param_index: dict[int, int] | None = None
        self._shards: dict[int, _Shard | None] = {}
        all_defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        all_defaults.update(OPTION_DEFAULTS)
        all_defaults.update(defaults)
        super().__init__(params, all_defaults)

    # ------------------------------------------------------------------ validation

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        index = len(self.param_groups)
        where = f"param_groups[{index}]"
        unknown = sorted(set(param_group) - set(self.defaults) - _GROUP_BOOKKEEPING)
        if unknown:
            close = difflib.get_close_matches(unknown[0], sorted(self.defaults), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known options: {', '.join(sorted(self.defaults))}"
            raise ValueError(f"{where}: unknown option {unknown[0]!r}{hint}")
        validate_group({**self.defaults, **param_group}, where)
        _check_projection_rank({**self.defaults, **param_group}, where)
        super().add_param_group(param_group)
        self._param_index = None
        group = self.param_groups[-1]
        if group["state_bits"] is not None and any(isinstance(p, DTensor) for p in group["params"]):
            self.param_groups.pop()
            raise ValueError(f"{where}: state_bits={group['state_bits']} is not supported on FSDP2-sharded (DTensor) "
                             "parameters: the quantization blocks would straddle shard boundaries; use state_bits=None")
        if group["state_bits"] is not None:
            # Shapes are known now: a moment the 4-bit block does not divide fails here, not at a step.
            try:
                for p in group["params"]:
                    state_layout(tuple(p.shape), p.dtype, group)
            except ValueError as error:
                self.param_groups.pop()
                raise ValueError(f"param_groups[{index}]: {error}") from None

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # Caches are derived from (seed, index, period); after unpickling or load_state_dict they
        # are rebuilt on demand.
        self._subsets = {}
        self._param_index = None
        self._shards = {}

    # ------------------------------------------------------------------ public helpers

    @torch.no_grad()
    def reset_momentum(self, params: Iterable[torch.Tensor] | None = None) -> None:
        """Zero Adam's moments of ``params`` (default: all) and restart their bias correction.

        Also restarts the reset warm-up ramp and the spike-clip skip window, forgets the
        norm-growth limiter's history, and for sparse momentum starts a new period with a new
        subset. Call it when a parameter's coordinates change (refactorization, merge).
        Parameters that have not stepped yet have nothing to reset.
        """
        if params is None:
            targets = [p for group in self.param_groups for p in group["params"]]
        else:
            targets = list(params)
            known = self._index_map()
            for p in targets:
                if id(p) not in known:
                    raise ValueError(f"reset_momentum: a parameter of shape {tuple(p.shape)} is not in this optimizer")
        for p in targets:
            state = self.state.get(p)
            if state and "exp_avg" in state:
                self._reset_state(p, state)

    def state_bytes(self) -> StateBytes:
        """Exact tensor bytes in ``self.state``, in total and per parameter group."""
        per_group = []
        for group in self.param_groups:
            n = 0
            for p in group["params"]:
                for value in self.state.get(p, {}).values():
                    if isinstance(value, torch.Tensor):
                        n += _tensor_bytes(value)
            per_group.append(n)
        cache = sum(_tensor_bytes(indices) for _, indices in self._subsets.values())
        return StateBytes(total=sum(per_group), per_group=per_group, subset_cache=cache)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Like ``Optimizer.load_state_dict`` but keeps each tensor's saved dtype.

        torch casts floating state to the parameter's dtype, which would round fp32 moments of a
        bf16 parameter (``state_dtype=torch.float32``) and break bit-identical resumption.

        Raises:
            ValueError: ``state_dict`` is not an optimizer state dict, has other groups or
                parameter counts, or holds a state tensor whose shape is not the one this
                optimizer's layout gives for that parameter (saved with other options or another
                model); the message names the parameter and the key.
        """
        check_state_dict(self, state_dict)
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id)
            if not saved:
                continue
            for key, value in saved.items():
                if isinstance(value, torch.Tensor) and self.state[p][key].dtype != value.dtype:
                    self.state[p][key] = value.to(device=p.device, copy=True)
        self._hold_local_state()

    def state_dict(self) -> dict[str, Any]:
        """``Optimizer.state_dict()``, every tensor with its global shape.

        Without FSDP2 this is torch's own. For a row-sharded (FSDP2) parameter with sparse
        momentum the rank holds an uneven slice of the subset's moments; they are presented as the
        whole ``k``-vector, a DTensor sharded evenly on dim 0 (one all-gather per moment, so this
        call is collective under FSDP2), which DCP saves and reshards like every other tensor.
        """
        state_dict = super().state_dict()
        flat = [(p, group) for group in self.param_groups for p in group["params"]]
        for index, (p, group) in enumerate(flat):
            entry = state_dict["state"].get(index)
            shard = self._shard(p)
            if shard is None or not entry or "exp_avg" not in entry or not self._sparse_rows(p, group):
                continue
            bounds = self._subset_bounds(p, group, entry["resets"], shard)
            state_dict["state"][index] = entry = dict(entry)  # a copy: self.state keeps the slices
            for key in MOMENT_KEYS:
                entry[key] = shard.join_slices(entry[key], bounds)
        return state_dict

    def subset_indices(self, p: torch.Tensor) -> torch.Tensor | None:
        """Flat indices, into the whole moment source (``p``, or ``R`` when projected), of the
        entries whose moments this rank keeps in the current sparse-momentum period: the subset
        itself on one process, this rank's slice of it under FSDP2 (their concatenation over the
        ranks is the one-process subset). ``None`` before ``p``'s first sparse step."""
        cached = self._subsets.get(p)
        if cached is None:
            return None
        shard = self._shard(p)
        if shard is None or not self._sparse_rows(p, self._group_of(p)):
            return cached[1]
        return cached[1] + shard.start * (self._source_numel(p, self._group_of(p)) // shard.shape[0])

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            plain: list[torch.Tensor] = []
            # FSDP2 matrices whose projector is due, refreshed together (_refresh_sharded).
            pending: list[tuple[torch.Tensor, torch.Tensor]] = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("ProjectedAdamW does not support sparse gradients")
                if self._is_plain(p, group) and self._use_foreach(p, group) and not self._quantized_plain(p, group):
                    plain.append(p)
                else:
                    self._step_param(p, group, pending)
            if pending:
                self._refresh_sharded(group, pending)
            if plain:
                self._step_plain(plain, group)
        return loss

    # ------------------------------------------------------------------ internals

    def _index_map(self) -> dict[int, int]:
        if self._param_index is None:
            flat = [p for g in self.param_groups for p in g["params"]]
            self._param_index = {id(p): i for i, p in enumerate(flat)}
        return self._param_index

    @staticmethod
    def _is_plain(p: torch.Tensor, group: dict[str, Any]) -> bool:
        matrix = p.dim() == 2
        return not (
            (matrix and (group["projection"] is not None or group["density"] < 1.0))
            or group["spike_threshold"] > 0
            or group["adaptive_clip"]
            or group["norm_scaling"]
        )

    @staticmethod
    def _quantized_plain(p: torch.Tensor, group: dict[str, Any]) -> bool:
        # A plain parameter's moments are shaped like it.
        return lowbit.is_quantized(p.numel(), group.get("state_bits"))

    @staticmethod
    def _use_foreach(p: torch.Tensor, group: dict[str, Any]) -> bool:
        # Multi-tensor kernels pay off on accelerators (fewer launches). On the CPU the
        # per-parameter loop measured ~25% faster on LLaMA-60M: foreach allocates every
        # parameter's temporaries at once, which on the CPU means fresh pages each step.
        foreach = group["foreach"]
        return foreach if foreach is not None else p.device.type != "cpu"

    @staticmethod
    def _state_dtype(p: torch.Tensor, group: dict[str, Any]) -> torch.dtype:
        return group["state_dtype"] or p.dtype

    def _state_tensor(self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any], key: str) -> torch.Tensor:
        """``state[key]``, created the first time as zeros of the layout's shape and dtype on ``p``'s
        device (a key missing from :func:`state_layout` raises ``KeyError``). Under FSDP2 the
        shape is the layout's shard view, and a moment that follows ``p``'s rows is a DTensor
        sharded like ``p`` (the others are replicated plain tensors)."""
        tensor = state.get(key)
        if tensor is None:
            shard = self._shard(p)
            if shard is None:
                spec = state_layout(tuple(p.shape), p.dtype, group).tensors()[key]
                tensor = state[key] = torch.zeros(spec.shape, dtype=spec.dtype, device=p.device)
            else:
                spec = state_layout(tuple(p.shape), p.dtype, group, shard=(shard.rank, shard.world)).tensors()[key]
                tensor = torch.zeros(spec.shape, dtype=spec.dtype, device=_local(p).device)
                if key in MOMENT_KEYS and self._dense_rows(p, group):
                    whole = state_layout(tuple(p.shape), p.dtype, group).tensors()[key].shape
                    tensor = shard.dtensor(tensor, whole)
                state[key] = tensor
        return tensor

    # ------------------------------------------------------------------ FSDP2 (DTensor) parameters

    def _shard(self, p: torch.Tensor) -> _Shard | None:
        """Where ``p``'s local rows sit when it is an FSDP2 DTensor (cached); ``None`` otherwise."""
        key = id(p)
        if key not in self._shards:
            self._shards[key] = _Shard.of(p)
        return self._shards[key]

    def _group_of(self, p: torch.Tensor) -> dict[str, Any]:
        return next(group for group in self.param_groups if any(q is p for q in group["params"]))

    @staticmethod
    def _replicated_moments(p: torch.Tensor, group: dict[str, Any]) -> bool:
        """Under FSDP2: the moments are of a left-projected ``R = PᵀG``, all-reduced, on every rank."""
        return p.dim() == 2 and group["projection"] is not None and proj.is_left(p.shape)

    def _sparse_rows(self, p: torch.Tensor, group: dict[str, Any]) -> bool:
        """Under FSDP2: sparse moments over a row-sharded source (each rank keeps its slice)."""
        return p.dim() == 2 and group["density"] < 1.0 and not self._replicated_moments(p, group)

    def _dense_rows(self, p: torch.Tensor, group: dict[str, Any]) -> bool:
        """Under FSDP2: dense moments that follow ``p``'s rows (shaped like ``p``, or ``G P``)."""
        return not self._replicated_moments(p, group) and not (p.dim() == 2 and group["density"] < 1.0)

    @staticmethod
    def _source_numel(p: torch.Tensor, group: dict[str, Any]) -> int:
        """Entries of what sparse momentum subsamples: ``p``, or the projected ``R``."""
        if group["projection"] is None:
            return p.numel()
        r = proj.effective_rank(p.shape, group["rank"])
        return r * (p.shape[1] if proj.is_left(p.shape) else p.shape[0])

    def _draw_subset(self, p: torch.Tensor, group: dict[str, Any], period: int, numel: int) -> torch.Tensor:
        k = subset_size(numel, group["density"])
        seed = (group["seed"], self._index_map()[id(p)], period, STREAM_SUBSET)
        return sample_subset(numel, k, seed=seed, device=_local(p).device)

    def _subset_bounds(self, p: torch.Tensor, group: dict[str, Any], period: int, shard: _Shard) -> list[int]:
        """Where each rank's slice of period ``period``'s subset starts in the sorted subset, and its end."""
        numel = self._source_numel(p, group)
        return shard.slice_bounds(self._draw_subset(p, group, period, numel), numel)

    @torch.no_grad()
    def _hold_local_state(self) -> None:
        """After loading: keep of every FSDP2 parameter's state what this rank holds (its rows of a
        row-sharded moment, its slice of a sparse one, all of a replicated tensor), whether the
        state dict came from :meth:`state_dict` on any number of ranks (via DCP) or from one process."""
        for group in self.param_groups:
            for p in group["params"]:
                state, shard = self.state.get(p), self._shard(p)
                if shard is None or not state:
                    continue
                for key, value in list(state.items()):
                    if not torch.is_tensor(value):
                        continue
                    if key in MOMENT_KEYS and self._sparse_rows(p, group):
                        whole = value.full_tensor() if isinstance(value, DTensor) else value
                        if whole.numel() == subset_size(self._source_numel(p, group), group["density"]):
                            bounds = self._subset_bounds(p, group, state["resets"], shard)
                            value = whole[bounds[shard.rank] : bounds[shard.rank + 1]].clone()
                    elif key in MOMENT_KEYS and self._dense_rows(p, group):
                        if not isinstance(value, DTensor):
                            value = distribute_tensor(value.to(_local(p).device), shard.mesh, [Shard(0)], src_data_rank=None)
                        elif tuple(value.placements) != (Shard(0),):
                            value = value.redistribute(shard.mesh, [Shard(0)])
                    elif isinstance(value, DTensor):
                        value = value.full_tensor()
                    state[key] = value

    def _refresh_sharded(self, group: dict[str, Any], pending: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Projector refresh (``"svd"``/``"randomized"``) of FSDP2 matrices, then the rest of their step.

        Each matrix's owner is rank ``parameter index mod world``. Every rank sends its rows of
        each gradient to the owner (one gather per matrix), the owners compute their bases
        concurrently with the one-process code, and each basis is broadcast from its owner (one
        broadcast of ``min(m, n) × r`` fp32 per matrix), so every rank holds the same bits.
        """
        index = self._index_map()
        jobs = []
        for p, grad in pending:
            shard = self._shard(p)
            owner = index[id(p)] % shard.world
            jobs.append([p, grad, shard, owner, shard.gather_rows(grad, owner)])
        for job in jobs:  # each rank factorizes the matrices it owns, all ranks at once
            p, _, _, _, whole = job
            job[4] = None if whole is None else self._basis(p, group, self.state[p], whole)
        for p, grad, shard, owner, basis in jobs:
            if basis is None:
                basis = torch.empty(min(p.shape), proj.effective_rank(p.shape, group["rank"]), device=grad.device)
            shard.broadcast(basis, owner)
            state = self.state[p]
            self._store_projector(p, group, state, basis)
            self._finish(p, group, state, grad)
        pending.clear()

    def _init_counters(self, state: dict[str, Any]) -> None:
        if "step" not in state:
            state["step"] = 0
            state["total_step"] = 0
            state["resets"] = 0

    def _reset_state(self, p: torch.Tensor, state: dict[str, Any]) -> None:
        for key in MOMENT_KEYS:
            state[key].zero_()
            if ABSMAX_KEYS[key] in state:  # quantized: zero codes and scales dequantize to 0
                state[ABSMAX_KEYS[key]].zero_()
        state["step"] = 0
        state["resets"] += 1
        if "limiter_norm" in state:
            state["limiter_norm"].zero_()
        self._subsets.pop(p, None)

    def _maybe_scheduled_reset(self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        interval = group["reset_interval"]
        if interval and state["total_step"] > 0 and state["total_step"] % interval == 0 and "exp_avg" in state:
            self._reset_state(p, state)

    def _warmup(self, group: dict[str, Any], state: dict[str, Any]) -> float:
        if state["resets"] == 0:
            return 1.0
        return spikes.reset_warmup_factor(state["step"] - 1, group["reset_warmup"])

    def _step_plain(self, params: list[torch.Tensor], group: dict[str, Any]) -> None:
        """Plain AdamW for parameters with no per-entry option, batched with ``torch._foreach``.

        Mirrors torch's multi-tensor AdamW op for op, so the result matches it to rounding; the
        per-parameter step counts (resets) and warm-up enter as per-tensor scalars.
        """
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        buckets: dict[tuple[Any, ...], list[torch.Tensor]] = {}
        for p in params:
            state = self.state[p]
            self._init_counters(state)
            for key in MOMENT_KEYS:
                self._state_tensor(p, group, state, key)
            self._maybe_scheduled_reset(p, group, state)
            state["step"] += 1
            state["total_step"] += 1
            buckets.setdefault((p.device, p.dtype, state["exp_avg"].dtype), []).append(p)

        for (_, p_dtype, s_dtype), bucket in buckets.items():
            for chunk in _chunks(bucket, _FOREACH_CHUNK_NUMEL):
                states = [self.state[p] for p in chunk]
                ps = [_local(p) for p in chunk]  # FSDP2: the local shards (elementwise, no communication)
                exp_avgs = [_local(s["exp_avg"]) for s in states]
                exp_avg_sqs = [_local(s["exp_avg_sq"]) for s in states]
                grads = [_local(p.grad) if p.grad.dtype == s_dtype else _local(p.grad).to(s_dtype) for p in chunk]
                if wd != 0:
                    torch._foreach_mul_(ps, 1.0 - lr * wd)
                torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
                torch._foreach_mul_(exp_avg_sqs, beta2)
                torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2)
                step_sizes = [-(lr / (1.0 - beta1 ** s["step"])) * self._warmup(group, s) for s in states]
                bias2_sqrt = [math.sqrt(1.0 - beta2 ** s["step"]) for s in states]
                denoms = torch._foreach_sqrt(exp_avg_sqs)
                torch._foreach_div_(denoms, bias2_sqrt)
                torch._foreach_add_(denoms, eps)
                if p_dtype == s_dtype:
                    torch._foreach_addcdiv_(ps, exp_avgs, denoms, step_sizes)
                else:
                    updates = torch._foreach_div(exp_avgs, denoms)
                    torch._foreach_mul_(updates, step_sizes)
                    torch._foreach_add_(ps, [u.to(p_dtype) for u in updates])

    def _subset(self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any], numel: int) -> torch.Tensor:
        """The current period's subset of the ``numel`` entries of the moment source (local flat
        indices: under FSDP2, of this rank's rows, this rank's slice of the global subset)."""
        period = state["resets"]
        cached = self._subsets.get(p)
        if cached is None or cached[0] != period:
            indices = self._draw_subset(p, group, period, numel)
            shard = self._shard(p)
            if shard is not None and self._sparse_rows(p, group):
                bounds = shard.slice_bounds(indices, numel)
                offset = shard.start * (numel // shard.shape[0])
                indices = indices[bounds[shard.rank] : bounds[shard.rank + 1]] - offset
            cached = (period, indices)
            self._subsets[p] = cached
        return cached[1]

    def _refresh_projector(self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any], grad: torch.Tensor):
        self._store_projector(p, group, state, self._basis(p, group, state, grad))

    def _basis(self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any], grad: torch.Tensor) -> torch.Tensor:
        """A new basis from the whole gradient ``grad`` (``"random"``: from the seed alone)."""
        kind = group["projection"]
        seed = (group["seed"], self._index_map()[id(p)], state["projector_updates"])
        if kind == "svd":
            return proj.svd_basis(grad, group["rank"])
        if kind == "randomized":
            return proj.randomized_basis(
                grad, group["rank"], seed=seed, oversample=group["oversample"], power_iters=group["power_iters"]
            )
        return proj.gaussian_projection(tuple(p.shape), group["rank"], seed=seed, device=grad.device)

    def _store_projector(self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any], basis: torch.Tensor) -> None:
        self._state_tensor(p, group, state, "projector").copy_(basis)
        state["projector_updates"] += 1

    @staticmethod
    def _projector_due(p: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> bool:
        due = projector_refresh_due(p, group, state)
        if due and "projector" not in state:
            state["projector_updates"] = 0
        return due

    def _step_param(self, p: torch.Tensor, group: dict[str, Any], pending: list | None = None) -> None:
        """One parameter with any combination of options (see the class docstring for the order).

        ``pending``: an FSDP2 matrix whose ``"svd"``/``"randomized"`` projector is due waits there
        to be refreshed with others (:meth:`_refresh_sharded`), which then finishes its step.
        """
        state = self.state[p]
        grad = self._prepare(p, group, state)
        if self._projector_due(p, group, state):
            shard = self._shard(p)
            if shard is not None and group["projection"] != "random" and pending is not None:
                pending.append((p, grad))
                if len(pending) == shard.world:
                    self._refresh_sharded(group, pending)
                return
            self._refresh_projector(p, group, state, grad)
        self._finish(p, group, state, grad)

    def _prepare(self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> torch.Tensor:
        """Steps 1–2: the scheduled reset, then Stable-SPAM on the gradient (its local rows under
        FSDP2, with the statistics of the whole tensor)."""
        self._init_counters(state)
        shard = self._shard(p)
        gamma_norm, gamma_norm_sq, gamma_max = group["gammas"]
        self._maybe_scheduled_reset(p, group, state)
        grad = _local(p.grad).to(self._state_dtype(p, group))
        stat_step = state["total_step"] + 1
        if group["adaptive_clip"]:
            max_abs_avg = self._state_tensor(p, group, state, "max_abs_avg")
            grad = spikes.adaptive_clip(grad, max_abs_avg, gamma_max, stat_step, max_of=None if shard is None else shard.max)
        if group["norm_scaling"]:
            norm_avg, norm_sq_avg = (self._state_tensor(p, group, state, key) for key in ("norm_avg", "norm_sq_avg"))
            grad = spikes.norm_scaling(grad, norm_avg, norm_sq_avg, gamma_norm, gamma_norm_sq, stat_step, group["eps"],
                                       norm_of=None if shard is None else shard.norm)
        return grad

    def _finish(self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any], grad: torch.Tensor) -> None:
        """Steps 3–6 once the projector (if any) is current: projection, sparse momentum, spike
        clipping, Adam and the update, on this rank's rows under FSDP2."""
        dtype = self._state_dtype(p, group)
        beta1, beta2 = group["betas"]
        lr, eps = group["lr"], group["eps"]
        shape = p.shape  # the whole parameter's, also under FSDP2
        shard = self._shard(p)
        param = _local(p)
        matrix = p.dim() == 2
        kind = group["projection"] if matrix else None
        sparse = matrix and group["density"] < 1.0
        fira = kind in ("svd", "randomized") and group["residual"] == "fira"

        low = grad
        if kind is not None:
            if shard is None:
                low = proj.project(grad, state["projector"])
            else:
                low = proj.project_rows(grad, state["projector"], shape, shard.start, shard.sum_)

        moment_input = low
        if sparse:
            numel = low.numel() if shard is None or self._replicated_moments(p, group) else shape[0] * low.shape[1]
            indices = self._subset(p, group, state, numel)
            moment_input = low.reshape(-1).index_select(0, indices)

        exp_avg, exp_avg_sq, quantized = self._moments(p, group, state, moment_input.shape)
        if quantized:
            moment_input = moment_input.float()

        if group["spike_threshold"] > 0 and state["step"] >= group["spike_skip_steps"]:
            moment_input = spikes.spam_clip(moment_input, exp_avg_sq, group["spike_threshold"])

        state["step"] += 1
        state["total_step"] += 1
        exp_avg.lerp_(moment_input, 1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(moment_input, moment_input, value=1.0 - beta2)
        if quantized:
            self._store_moments(group, state, (exp_avg, exp_avg_sq))
        bias1 = 1.0 - beta1 ** state["step"]
        bias2_sqrt = math.sqrt(1.0 - beta2 ** state["step"])
        # m/(sqrt(v) + eps·sqrt(bc2)) times lr·sqrt(bc2)/bc1 is torch's lr/bc1 · m/(sqrt(v)/sqrt(bc2)
        # + eps) rearranged. Keeping the bias factor out of the direction makes Fira's and APOLLO's
        # norm ratios and limiter see the same quantity as in their papers.
        denom = exp_avg_sq.sqrt().add_(eps * bias2_sqrt)
        direction = torch.div(exp_avg, denom, out=denom).to(dtype)
        step_size = lr * bias2_sqrt / bias1 * self._warmup(group, state)

        if group["weight_decay"] != 0:
            param.mul_(1.0 - lr * group["weight_decay"])

        if sparse and kind is None and param.is_contiguous():
            # Scatter straight into the parameter: no dense m×n temporary.
            param.view(-1).index_add_(0, indices, direction.to(p.dtype), alpha=-step_size)
            return
        if sparse:
            dense = torch.zeros(low.numel(), dtype=direction.dtype, device=direction.device)
            dense.index_add_(0, indices, direction)
            direction = dense.view(low.shape)

        # In-place arithmetic below on purpose: these are full m×n temporaries.
        if kind in ("svd", "randomized"):
            update = self._project_back(direction, state, shape, shard).mul_(group["scale"])
            if fira:
                back = self._project_back(low, state, shape, shard)
                residual = torch.sub(grad, back, out=back)
                residual.mul_(proj.channel_scaling(direction, low, shape))
                update.add_(self._limit(p, group, state, residual))
        elif kind == "random":
            per_channel = group["scale_type"] == "channel"
            # APOLLO-Mini's tensor-wise norms of a row-sharded R are the whole R's.
            norm_of = shard.norm if shard is not None and not proj.is_left(shape) else None
            scaled = grad * proj.channel_scaling(direction, low, shape, per_channel=per_channel, norm_of=norm_of)
            update = self._limit(p, group, state, scaled).mul_(group["scale"])
        else:
            update = direction
        param.add_(update.to(p.dtype), alpha=-step_size)

    @staticmethod
    def _project_back(low: torch.Tensor, state: dict[str, Any], shape: torch.Size, shard: _Shard | None) -> torch.Tensor:
        if shard is None:
            return proj.project_back(low, state["projector"], shape)
        return proj.project_back_rows(low, state["projector"], shape, shard.start, shard.rows)

    def _moments(
        self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any], shape: torch.Size
    ) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """``(exp_avg, exp_avg_sq, quantized)`` shaped ``shape``, to update in place: the state
        tensors themselves or, when the layout stores them quantized, their fp32 dequantization,
        which :meth:`_store_moments` writes back."""
        if self._shard(p) is not None and p.dim() == 2 and group["density"] < 1.0:
            # FSDP2: this rank's slice of the subset changes size with the period; the moments
            # are zero at a new period (a reset), so a new size is allocated as zeros.
            for key in MOMENT_KEYS:
                if key in state and tuple(state[key].shape) != tuple(shape):
                    state[key] = torch.zeros(shape, dtype=state[key].dtype, device=state[key].device)
                elif key not in state:
                    state[key] = torch.zeros(shape, dtype=self._state_dtype(p, group), device=_local(p).device)
        stored = [_local(self._state_tensor(p, group, state, key)) for key in MOMENT_KEYS]
        if stored[0].dtype != torch.uint8:
            return stored[0], stored[1], False
        numel = math.prod(shape)
        m, v = (
            lowbit.dequantize_blockwise(
                codes, self._state_tensor(p, group, state, ABSMAX_KEYS[key]), group["state_bits"],
                MOMENT_SIGNED[key], numel,
            ).view(shape)
            for key, codes in zip(MOMENT_KEYS, stored)
        )
        return m, v, True

    @staticmethod
    def _store_moments(group: dict[str, Any], state: dict[str, Any], moments: tuple[torch.Tensor, ...]) -> None:
        """Requantize fp32 ``moments`` into their codes and block scales."""
        for key, value in zip(MOMENT_KEYS, moments):
            codes, absmax = lowbit.quantize_blockwise(value, group["state_bits"], MOMENT_SIGNED[key])
            state[key].copy_(codes)
            state[ABSMAX_KEYS[key]].copy_(absmax)

    def _limit(self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any], update: torch.Tensor) -> torch.Tensor:
        shard = self._shard(p)  # under FSDP2 ``update`` is this rank's rows: the norm is the whole one's
        norm_of = None if shard is None else shard.norm
        return proj.limit_norm_growth(update, self._state_tensor(p, group, state, "limiter_norm"), norm_of=norm_of)


# ---------------------------------------------------------------------- FSDP2 (DTensor) shards


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (the tensor itself, so in-place updates land in it); else ``t``."""
    return t.to_local() if isinstance(t, DTensor) else t


@dataclass(frozen=True)
class _Shard:
    """Where an FSDP2 parameter's local rows sit: a DTensor sharded on dim 0 over a 1-D mesh,
    rows ``start : start + rows`` of a tensor of global ``shape`` on rank ``rank`` of ``world``,
    with the collectives the optimizer needs on that mesh's process group."""

    mesh: Any
    group: Any
    rank: int
    world: int
    start: int
    rows: int
    shape: torch.Size

    @classmethod
    def of(cls, p: torch.Tensor) -> _Shard | None:
        if not isinstance(p, DTensor):
            return None
        mesh = p.device_mesh
        if mesh.ndim != 1 or tuple(p.placements) != (Shard(0),) or p.dim() == 0:
            raise ValueError(
                f"ProjectedAdamW steps DTensor parameters sharded on dim 0 over a 1-D device mesh (FSDP2's fully_shard); "
                f"got placements {tuple(p.placements)} on a {mesh.ndim}-D mesh (HSDP, tensor parallelism are not supported)"
            )
        rank, world = mesh.get_local_rank(), mesh.size()
        start, rows = shard_range(p.shape[0], rank, world)
        if p.to_local().shape[0] != rows:
            raise ValueError(f"a DTensor parameter of shape {tuple(p.shape)} holds {p.to_local().shape[0]} rows on rank {rank} "
                             f"of {world}, not {rows}: only torch.chunk's even split (Shard(0)) is supported")
        return cls(mesh, mesh.get_group(), rank, world, start, rows, p.shape)

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce SUM of ``t`` in place; returns ``t``."""
        dist.all_reduce(t, group=self.group)
        return t

    def norm(self, t: torch.Tensor) -> torch.Tensor:
        """``‖T‖`` of the whole tensor whose row shard ``t`` is: ``sqrt(Σ_ranks ‖t‖²)`` (one scalar all-reduce)."""
        squared = torch.linalg.vector_norm(t).square()
        return self.sum_(squared).sqrt()

    def max(self, magnitude: torch.Tensor) -> torch.Tensor:
        """``max`` of the whole tensor whose row shard ``magnitude`` (≥ 0) is (one scalar all-reduce MAX)."""
        local = magnitude.max() if magnitude.numel() else magnitude.new_zeros(())
        dist.all_reduce(local, op=dist.ReduceOp.MAX, group=self.group)
        return local

    def dtensor(self, local: torch.Tensor, shape: tuple[int, ...]) -> DTensor:
        """``local`` as this rank's rows of a DTensor of global ``shape`` sharded like the parameter."""
        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(local, self.mesh, [Shard(0)], run_check=False, shape=torch.Size(shape), stride=stride)

    def gather_rows(self, local: torch.Tensor, owner: int) -> torch.Tensor | None:
        """The whole tensor on rank ``owner`` (``None`` elsewhere) from every rank's rows: one gather
        of ``ceil(m / world)`` rows per rank (padded, as the collective needs equal sizes)."""
        chunk = -(-self.shape[0] // self.world)
        send = local
        if local.shape[0] != chunk:
            send = torch.cat([local, local.new_zeros(chunk - local.shape[0], *local.shape[1:])])
        received = [torch.empty_like(send) for _ in range(self.world)] if self.rank == owner else None
        dist.gather(send.contiguous(), received, group=self.group, group_dst=owner)
        return torch.cat(received)[: self.shape[0]] if received is not None else None

    def broadcast(self, t: torch.Tensor, owner: int) -> torch.Tensor:
        dist.broadcast(t, group=self.group, group_src=owner)
        return t

    def slice_bounds(self, indices: torch.Tensor, numel: int) -> list[int]:
        """Positions in the sorted flat ``indices`` (of a tensor of ``numel`` entries with this
        parameter's rows) where each rank's rows begin, then ``len(indices)``: rank ``i`` keeps
        ``indices[b[i] : b[i + 1]]``."""
        row = numel // self.shape[0]
        edges = [shard_range(self.shape[0], rank, self.world)[0] * row for rank in range(self.world)]
        edges = torch.tensor(edges, dtype=indices.dtype, device=indices.device)
        return torch.searchsorted(indices, edges).tolist() + [indices.numel()]

    def join_slices(self, local: torch.Tensor, bounds: list[int]) -> DTensor:
        """The whole vector whose rank-``i`` slice is ``[bounds[i], bounds[i + 1])`` (``local`` here),
        as a DTensor sharded evenly on dim 0: one all-gather, padded to the longest slice."""
        sizes = [bounds[rank + 1] - bounds[rank] for rank in range(self.world)]
        width = max(sizes)
        send = torch.cat([local, local.new_zeros(width - local.numel())]) if local.numel() != width else local
        received = [torch.empty_like(send) for _ in range(self.world)]
        dist.all_gather(received, send.contiguous(), group=self.group)
        whole = torch.cat([part[:size] for part, size in zip(received, sizes)])
        return distribute_tensor(whole, self.mesh, [Shard(0)], src_data_rank=None)


# ---------------------------------------------------------------------- validation


def projector_refresh_due(p: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> bool:
    """Whether the next step of ``p`` recomputes its projection basis: its first step, and every
    ``update_proj_gap`` steps of the parameter's own clock (``total_step``). No side effect: the
    projected DDP communication hook asks it before the optimizer steps."""
    if p.dim() != 2 or group["projection"] is None:
        return False
    return "projector" not in state or state["total_step"] % group["update_proj_gap"] == 0


def check_state_dict(optimizer: Optimizer, state_dict: Any) -> None:
    """What :meth:`ProjectedAdamW.load_state_dict` checks before it loads anything."""
    if not isinstance(state_dict, dict) or not isinstance(state_dict.get("state"), dict) \
            or not isinstance(state_dict.get("param_groups"), list):
        keys = sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__
        raise ValueError(f"load_state_dict: expected an optimizer.state_dict() with 'state' and 'param_groups', got {keys}")
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(optimizer.param_groups):
        raise ValueError(f"load_state_dict: the state dict has {len(saved_groups)} parameter groups, this optimizer "
                         f"{len(optimizer.param_groups)}; build the optimizer with the same groups")
    for index, (saved, group) in enumerate(zip(saved_groups, optimizer.param_groups)):
        ids = saved.get("params") if isinstance(saved, dict) else None
        if not isinstance(ids, list) or len(ids) != len(group["params"]):
            count = len(ids) if isinstance(ids, list) else "no"
            raise ValueError(f"load_state_dict: param_groups[{index}] has {count} parameters in the state dict and "
                             f"{len(group['params'])} here; build the optimizer over the same parameters")
        if group.get("use_muon"):
            continue  # Muon's own state, checked by its layout
        for saved_id, p in zip(ids, group["params"]):
            entry = state_dict["state"].get(saved_id)
            if not isinstance(entry, dict):
                continue
            expected = state_layout(tuple(p.shape), p.dtype, group).tensors()
            for key, value in entry.items():
                if torch.is_tensor(value) and key in expected and tuple(value.shape) != tuple(expected[key].shape):
                    raise ValueError(
                        f"load_state_dict: param_groups[{index}] parameter {tuple(p.shape)}: {key} has shape "
                        f"{tuple(value.shape)} in the state dict but {tuple(expected[key].shape)} here (saved with other "
                        "options, such as rank or density, or for another model)"
                    )


def _check_projection_rank(group: dict[str, Any], where: str) -> None:
    """A projection rank above a matrix's ``min(m, n)`` is refused, not silently capped."""
    if group["projection"] is None:
        return
    params = group["params"]
    params = [params] if isinstance(params, torch.Tensor) else list(params)
    for p in params:
        if isinstance(p, torch.Tensor) and p.dim() == 2 and group["rank"] > min(p.shape):
            raise ValueError(f"{where}: rank {group['rank']} is larger than a {p.shape[0]}×{p.shape[1]} matrix allows "
                             f"(at most {min(p.shape)}); lower rank or leave that matrix out of the group")


def validate_group(group: dict[str, Any], where: str) -> None:
    """Raise ``ValueError("param_groups[i]: <option> ...")`` for the first invalid option."""

    def fail(message: str) -> None:
        raise ValueError(f"{where}: {message}")

    def number(name: str) -> float:
        value = group[name]
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                fail(f"{name} must be a number, got a tensor of shape {tuple(value.shape)}")
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            fail(f"{name} must be a number, got {value!r}")
        return value

    def integer(name: str, minimum: int) -> None:
        value = group[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            fail(f"{name} must be an integer >= {minimum}, got {value!r}")

    def flag(name: str) -> None:
        if not isinstance(group[name], bool):
            fail(f"{name} must be True or False, got {group[name]!r}")

    for name in ("lr", "eps", "weight_decay", "spike_threshold"):
        value = number(name)
        if value < 0 or math.isinf(value):
            fail(f"{name} must be a finite number >= 0, got {group[name]}")
    for name, count in (("betas", 2), ("gammas", 3)):
        values = group[name]
        if not isinstance(values, (tuple, list)) or len(values) != count:
            fail(f"{name} must be a tuple of {count} numbers in [0, 1), got {values!r}")
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
                fail(f"{name} must be in [0, 1), got {values!r}")
    if group["projection"] not in PROJECTIONS:
        fail(f"projection must be one of {PROJECTIONS}, got {group['projection']!r}")
    if group["residual"] not in RESIDUALS:
        fail(f"residual must be one of {RESIDUALS}, got {group['residual']!r}")
    if group["scale_type"] not in SCALE_TYPES:
        fail(f"scale_type must be one of {SCALE_TYPES}, got {group['scale_type']!r}")
    integer("rank", 1)
    integer("update_proj_gap", 1)
    integer("oversample", 0)
    integer("power_iters", 0)
    integer("reset_interval", 0)
    integer("reset_warmup", 0)
    integer("spike_skip_steps", 0)
    integer("seed", 0)
    if group["seed"] >= 2**63:
        fail(f"seed must be < 2**63, got {group['seed']}")
    scale = number("scale")
    if not (scale > 0 and math.isfinite(scale)):
        fail(f"scale must be a finite number > 0, got {scale}")
    density = number("density")
    if not 0.0 < density <= 1.0:
        fail(f"density must be in (0, 1], got {density}")
    flag("adaptive_clip")
    flag("norm_scaling")
    if group["foreach"] is not None:
        flag("foreach")
    state_dtype = group["state_dtype"]
    if state_dtype is not None and not (isinstance(state_dtype, torch.dtype) and state_dtype.is_floating_point):
        fail(f"state_dtype must be None or a floating torch.dtype, got {state_dtype!r}")
    state_bits = group["state_bits"]
    if state_bits is not None and (type(state_bits) is not int or state_bits not in lowbit.BITS):
        fail(f"state_bits must be one of (None, {', '.join(map(str, lowbit.BITS))}), got {state_bits!r}")
    if group["residual"] is not None and group["projection"] not in ("svd", "randomized"):
        fail(f"residual={group['residual']!r} needs projection 'svd' or 'randomized', got {group['projection']!r}")
    if density < 1.0 and (group["projection"] == "random" or group["residual"] is not None):
        fail(
            f"density < 1 cannot be combined with projection={group['projection']!r} / "
            f"residual={group['residual']!r}: their per-channel norms need every entry of Adam(R)"
        )
