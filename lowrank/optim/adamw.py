"""ProjectedAdamW: AdamW with gradient projection, sparse momentum, spike handling, resets and
8-/4-bit moments; the class that holds the groups and the state, loops over the parameters and
calls the pure functions of one module per technique (see the class docstring)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch.optim import Optimizer

from ..seeding import subset_size
from . import lowbit
from . import projection as proj
from . import sparse
from .adam import adamw_foreach_, foreach_chunks as _chunks  # _chunks: the name the tests patch around
from .layout import ABSMAX_KEYS, MOMENT_KEYS, MOMENT_SIGNED, StateBytes, state_layout
from .options import (  # noqa: F401  (re-exported: lowrank.optim.adamw was their home)
    ADAM_DEFAULTS,
    OPTION_DEFAULTS,
    PROJECTIONS,
    RESIDUALS,
    SCALE_TYPES,
    check_known_options,
    check_projection_rank,
    check_state_dict,
    check_step_hyperparameters,
    validate_group,
)
from .projection import projector_refresh_due  # noqa: F401  (re-exported, as above)
from .reset import DEFAULT_RESET_MOMENTS, init_counters, reset_state_, scheduled_reset_due, warmup_factor
from .rotation import rotate_moment
from .shard import (RowShard, dense_rows, hold_local_, is_sharded, local, replicated_moments, resize_slice_,
                    sparse_rows)
from .spikes import stable_spam
from .update import adamw_update_

# The multi-tensor path allocates temporaries (denominators, casts) as large as the tensors it is
# given; feeding it whole parameter groups would add ~14 bytes per parameter at peak for bf16
# weights with fp32 moments (90 GB at 7B). Chunks of at most this many elements bound that.
FOREACH_CHUNK_NUMEL = 1 << 25


def _tensor_bytes(t: torch.Tensor) -> int:
    t = local(t)  # a DTensor's bytes on this rank
    return t.numel() * t.element_size()


def multi_tensor_step(ndim: int, numel: int, group: Mapping[str, Any], device_type: str) -> bool:
    """Whether ``step()`` batches a parameter (``ndim`` dimensions, ``numel`` entries) of ``group``
    with ``torch._foreach_*`` kernels: plain Adam (no per-entry option), ``foreach`` (``None``: on
    accelerators; on the CPU the per-parameter loop measured ~25% faster on LLaMA-60M, since
    foreach allocates every parameter's temporaries at once), not quantized."""
    if (ndim == 2 and (group["projection"] is not None or group["density"] < 1.0)) \
            or group["spike_threshold"] > 0 or group["adaptive_clip"] or group["norm_scaling"]:
        return False
    foreach = group["foreach"] if group["foreach"] is not None else device_type != "cpu"
    # A plain parameter's moments are shaped like it.
    return foreach and not lowbit.is_quantized(numel, group.get("state_bits"))


class ProjectedAdamW(Optimizer):
    r"""AdamW with optional gradient projection, sparse momentum, spike handling and momentum resets.

    The core is decoupled-weight-decay Adam with bias correction, exactly as ``torch.optim.AdamW``
    (``p ← p·(1 − lr·wd) − lr · m̂ / (sqrt(v̂) + eps)``); with every option off the two agree to
    rounding. Each option below is a parameter-group key, so different parameters can use
    different methods. For one parameter with gradient ``G`` a step does, in order:

    1. **Scheduled reset** (``reset_interval`` T > 0; :mod:`~lowrank.optim.reset`): after every T
       steps of this parameter, zero both moments and restart bias correction.
    2. **Stable-SPAM** (``adaptive_clip``, ``norm_scaling``, ``gammas``; :mod:`~lowrank.optim.spikes`)
       on ``G``. Its statistics describe the gradient and survive momentum resets; unlike the
       reference, the reset happens before the step's gradient enters the moments.
    3. **Projection** (``projection``, ``rank``, ``update_proj_gap``, ``scale``; 2-D parameters;
       :mod:`~lowrank.optim.projection`): every ``update_proj_gap`` steps a basis ``P`` of
       ``rank`` columns on the smaller side of ``G``; Adam runs on ``R = PᵀG`` (or ``GP``).
       ``"svd"``: GaLore, update ``scale · P·Adam(R)``; ``"randomized"``: the same subspace from a
       randomized range finder (``oversample``, ``power_iters``), tens of times cheaper;
       ``"random"``: APOLLO, the raw gradient scaled per channel by ``‖Adam(R)_j‖/‖R_j‖``
       (``scale_type="tensor"``: APOLLO-Mini), limited, times ``scale`` (APOLLO's ``scale=S`` is
       ``sqrt(S)`` here). ``residual="fira"`` (:mod:`~lowrank.optim.fira`) adds Fira's scaled
       and limited residual ``G − P PᵀG``, which ``scale`` does not multiply.
    4. **Sparse momentum** (``density`` d < 1, 2-D; :mod:`~lowrank.optim.sparse`): moments for a
       seeded subset of ``round(d·numel)`` entries (of ``R`` when projected), redrawn at each
       reset; weight decay still applies to every entry. Not combinable with ``"random"`` or a
       residual (their per-channel norms need every entry of ``Adam(R)``).
    5. **Spike clipping** (``spike_threshold`` θ > 0; SPAM, :mod:`~lowrank.optim.spikes`):
       ``g ← clip(g, ±sqrt(θ·v_{t-1}))`` on what enters the moments, skipped for the first
       ``spike_skip_steps`` steps after the start and after each reset.
    6. **Adam** (:mod:`~lowrank.optim.adam`) on what is left, times the **reset warm-up**
       (``reset_warmup`` W > 0: 0.01 at a reset, along a cosine to 1 after W steps).

    :func:`lowrank.optim.update.adamw_update_` composes steps 3–6 for one parameter;
    :mod:`lowrank.optim.options` holds every default and check.

    **Low-bit moments** (``state_bits`` 8 or 4; ``None`` keeps them in ``state_dtype``): block-wise
    dynamic quantization as in bitsandbytes' and torchao's 8-/4-bit optimizers
    (:mod:`lowrank.optim.lowbit`), of whatever the moments hold in every mode. Each step decodes
    both moments to fp32, runs steps 5–6 on them in fp32 and encodes them back. Moments of fewer
    than 4096 entries stay in ``state_dtype``; a 4-bit moment whose size 128 does not divide is a
    ``ValueError`` when the group is added. Quantized parameters take the per-parameter path.

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

    **FSDP2** (``DTensor`` parameters sharded on dim 0 over a 1-D mesh, as
    ``torch.distributed.fsdp.fully_shard`` makes them): each rank steps its local rows and keeps
    their state; what each technique communicates, and how checkpoints hold the state, is in
    :mod:`lowrank.optim.shard`. Not supported: ``state_bits`` (a ``ValueError``), other
    placements or a multi-dimensional mesh.

    **Per parameter** (:meth:`step_param`): ``step()`` is a loop of per-parameter updates, and
    ``step_param(p, grad)`` runs the very same update for one parameter, so an in-backward hook
    (``register_post_accumulate_grad_hook``) gives bit-identical results. See :meth:`step_param`
    for the two places where ``step()`` batches (``foreach``, FSDP2 projector refreshes).

    Args:
        params: parameters or parameter-group dicts; groups may set any option below.
        lr: learning rate, read from the group every step (LR schedulers work).
        betas: Adam's ``(beta1, beta2)``, each in ``[0, 1)``.
        eps: added to ``sqrt(v̂)`` (torch's placement; GaLore adds it to ``sqrt(v)``).
        weight_decay: decoupled weight decay, applied to every entry.
        **defaults: group defaults for the options above (their defaults:
            :data:`lowrank.optim.options.OPTION_DEFAULTS`); ``state_dtype``: the full-precision
            dtype of moments, projectors and moments too small to quantize (``None``: the
            parameter's); ``foreach``: batch plain-Adam parameters with ``torch._foreach_*``
            kernels (``None``: on accelerators, not on the CPU, where the loop is faster).
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
        self._clear_caches()
        all_defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        all_defaults.update(OPTION_DEFAULTS)
        all_defaults.update(defaults)
        super().__init__(params, all_defaults)

    def _clear_caches(self) -> None:
        # Derived from (seed, index, period) and the groups; rebuilt on demand.
        self._subsets: dict[torch.Tensor, tuple[int, torch.Tensor]] = {}
        self._param_index: dict[int, int] | None = None
        self._param_group: dict[int, dict[str, Any]] | None = None
        self._shards: dict[int, RowShard | None] = {}
        # step_param(p, value=...): the tensor p's update is written to, for that call only
        self._values: dict[int, torch.Tensor] = {}

    # ------------------------------------------------------------------ groups

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        index = len(self.param_groups)
        where = f"param_groups[{index}]"
        check_known_options(param_group, self.defaults, where)
        validate_group({**self.defaults, **param_group}, where)
        check_projection_rank({**self.defaults, **param_group}, where)
        super().add_param_group(param_group)
        self._param_index = self._param_group = None
        group = self.param_groups[-1]
        if group["state_bits"] is not None and any(is_sharded(p) for p in group["params"]):
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
        self._clear_caches()

    # ------------------------------------------------------------------ public helpers

    @torch.no_grad()
    def reset_momentum(self, params: Iterable[torch.Tensor] | None = None, moments: str = DEFAULT_RESET_MOMENTS) -> None:
        """Zero Adam's moments of ``params`` (default: all) and restart their bias correction.

        Also restarts the reset warm-up ramp and the spike-clip skip window, forgets the
        norm-growth limiter's history, and for sparse momentum starts a new period with a new
        subset. Call it when a parameter's coordinates change (refactorization, merge).
        Parameters that have not stepped yet have nothing to reset. ``moments="first"``: only
        ``exp_avg`` (:data:`lowrank.optim.reset.RESET_MOMENTS` says what goes on).
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
                self._reset(p, state, moments)

    def rotation_blocker(self, p: torch.Tensor) -> str | None:
        """Why :meth:`rotate_momentum` cannot carry ``p``'s moments, or ``None`` when it can: only
        moments shaped like a (whole, 2-D) ``p`` have coordinates a factor map acts on."""
        group = self._group_of(p)
        if p.dim() != 2:
            return f"a {p.dim()}-D parameter has no factor coordinates"
        if group["projection"] is not None:
            return f"its moments are projected (projection={group['projection']!r}): they live in the projector's basis"
        if group["density"] < 1.0:
            return f"its moments are sparse (density={group['density']}): a map mixes entries outside the subset"
        if is_sharded(p):
            return "it is FSDP2-sharded: a map mixes the rows of A across ranks"
        return None

    @torch.no_grad()
    def rotate_momentum(self, p: torch.Tensor, transform: torch.Tensor, dim: int) -> None:
        """Carry ``p``'s moments into coordinates where its gradient is ``G·T`` (``dim=1``) or ``T·G``
        (``dim=0``), e.g. after a refactorization (:func:`lowrank.linalg.refactorization_maps`),
        instead of resetting them: :func:`lowrank.optim.rotation.rotate_moment`. Low-bit moments are
        decoded, mapped and encoded again. Bias correction and the other counters go on. A parameter
        that has not stepped has nothing to carry; one whose layout has no such coordinates
        (:meth:`rotation_blocker`) is a ``ValueError``."""
        blocker = self.rotation_blocker(p)
        if blocker is not None:
            raise ValueError(f"rotate_momentum: cannot carry the moments of a parameter of shape {tuple(p.shape)}: "
                             f"{blocker}; reset them instead (reset_momentum)")
        group, state = self._group_of(p), self.state.get(p)
        if not state or "exp_avg" not in state:
            return
        m, v, quantized = self._moments(p, group, state, p.shape)
        rotated = (rotate_moment(m, transform, dim), rotate_moment(v, transform, dim, squared=True))
        if quantized:
            self._store_moments(group, state, rotated)
        else:
            m.copy_(rotated[0])
            v.copy_(rotated[1])

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
        whole ``k``-vector, a DTensor sharded evenly (one all-gather per moment, so this call is
        collective under FSDP2), which DCP saves and reshards like every other tensor.
        """
        state_dict = super().state_dict()
        flat = [(p, group) for group in self.param_groups for p in group["params"]]
        for index, (p, group) in enumerate(flat):
            entry = state_dict["state"].get(index)
            shard = self._shard(p)
            if shard is None or not entry or "exp_avg" not in entry or not sparse_rows(p.shape, group):
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
        shard, group = self._shard(p), self._group_of(p)
        if shard is None or not sparse_rows(p.shape, group):
            return cached[1]
        return cached[1] + shard.start * (sparse.source_numel(p.shape, p.numel(), group) // shard.shape[0])

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One step of every parameter with a gradient: :meth:`step_param` for each, batched where
        that is bit-identical (see there)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):  # all, before any weight moves
            if any(p.grad is not None for p in group["params"]):
                check_step_hyperparameters(group, f"param_groups[{index}]")
        for group in self.param_groups:
            batch: list[torch.Tensor] = []
            # FSDP2 matrices whose projector is due, refreshed together (_refresh_sharded).
            pending: list[tuple[torch.Tensor, torch.Tensor]] = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if self._batched(p, group, p.grad):
                    batch.append(p)
                else:
                    self._update(p, group, p.grad, pending)
            if pending:
                self._refresh_sharded(group, pending)
            if batch:
                self._step_foreach(batch, group, [p.grad for p in batch])
        return loss

    @torch.no_grad()
    def step_param(self, p: torch.Tensor, grad: torch.Tensor | None = None, *, value: torch.Tensor | None = None) -> None:
        """Update the one parameter ``p`` from ``grad`` (default ``p.grad``) and its state: what
        :meth:`step` does for ``p``, bit for bit. The entry point of an optimizer step inside
        backward (``p.register_post_accumulate_grad_hook(lambda p: opt.step_param(p))``).

        ``value``: update this tensor (``p``'s shape) in place of ``p``, in its dtype: ``p`` only
        names the state. bf16 storage steps an fp32 copy and rounds it back
        (:func:`lowrank.precision.step_from_bf16`) without touching ``p``'s dtype, which would
        detach ``p`` from its gradient accumulator and so from DDP's hooks.

        ``step()`` batches in two places, both bit-identical to this one-parameter call:

        * ``foreach`` parameters (plain Adam, option on or an accelerator): ``step()`` runs the
          multi-tensor kernels on many at once, this call on a list of one; the kernels work
          tensor by tensor, so the bits are the same.
        * FSDP2 matrices whose ``"svd"``/``"randomized"`` projector is due: ``step()`` refreshes
          ``world`` of them at a time (their owners factorize concurrently); this call refreshes
          ``p`` alone, the same gather to the same owner and the same broadcast. It is a
          collective, as the step of a sharded parameter is: every rank calls it for ``p``.

        Hyper-parameters are read from ``p``'s group now, so an LR schedule must have set this
        step's ``lr`` before backward. A parameter in no group is a ``ValueError``.
        """
        group = self._group_of(p)
        grad = p.grad if grad is None else grad
        if grad is None:
            raise ValueError(f"step_param: a parameter of shape {tuple(p.shape)} has no gradient")
        if value is not None and value.shape != p.shape:
            raise ValueError(f"step_param: value has shape {tuple(value.shape)}, the parameter {tuple(p.shape)}")
        index = next(i for i, g in enumerate(self.param_groups) if g is group)
        check_step_hyperparameters(group, f"param_groups[{index}]")
        if value is not None:
            self._values[id(p)] = value
        try:
            if self._batched(p, group, grad):
                self._step_foreach([p], group, [grad])
                return
            pending: list[tuple[torch.Tensor, torch.Tensor]] = []
            self._update(p, group, grad, pending)
            if pending:
                self._refresh_sharded(group, pending)
        finally:
            self._values.pop(id(p), None)

    # ------------------------------------------------------------------ internals

    def _value(self, p: torch.Tensor) -> torch.Tensor:
        """The tensor ``p``'s update is written to, whose dtype is the step's (``step_param``'s ``value``, or ``p``)."""
        return self._values.get(id(p), p)

    def _index_map(self) -> dict[int, int]:
        if self._param_index is None:
            flat = [p for g in self.param_groups for p in g["params"]]
            self._param_index = {id(p): i for i, p in enumerate(flat)}
        return self._param_index

    def _group_of(self, p: torch.Tensor) -> dict[str, Any]:
        if self._param_group is None:
            self._param_group = {id(q): group for group in self.param_groups for q in group["params"]}
        group = self._param_group.get(id(p))
        if group is None:
            raise ValueError(f"a parameter of shape {tuple(p.shape)} is not in this optimizer")
        return group

    def _batched(self, p: torch.Tensor, group: dict[str, Any], grad: torch.Tensor) -> bool:
        if grad.is_sparse:
            raise RuntimeError("ProjectedAdamW does not support sparse gradients")
        return multi_tensor_step(p.dim(), p.numel(), group, p.device.type)

    def _state_tensor(self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any], key: str) -> torch.Tensor:
        """``state[key]``, created the first time as zeros of the layout's shape and dtype on ``p``'s
        device (a key missing from :func:`state_layout` raises ``KeyError``). Under FSDP2 the
        shape is the layout's shard view, and a moment that follows ``p``'s rows is a DTensor
        sharded like ``p`` (the others are replicated plain tensors)."""
        tensor = state.get(key)
        if tensor is None:
            shard = self._shard(p)
            if shard is None:
                spec = state_layout(tuple(p.shape), self._value(p).dtype, group).tensors()[key]
                tensor = state[key] = torch.zeros(spec.shape, dtype=spec.dtype, device=p.device)
            else:
                spec = state_layout(tuple(p.shape), self._value(p).dtype, group, shard=(shard.rank, shard.world)).tensors()[key]
                tensor = torch.zeros(spec.shape, dtype=spec.dtype, device=local(p).device)
                if key in MOMENT_KEYS and dense_rows(p.shape, group):
                    tensor = shard.dtensor(tensor, state_layout(tuple(p.shape), self._value(p).dtype, group).tensors()[key].shape)
                state[key] = tensor
        return tensor

    def _moments(
        self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any], shape: torch.Size
    ) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """``(exp_avg, exp_avg_sq, quantized)`` shaped ``shape``, to update in place: the state
        tensors themselves or, when the layout stores them quantized, their fp32 decoding, which
        :meth:`_store_moments` encodes back."""
        if self._shard(p) is not None and p.dim() == 2 and group["density"] < 1.0:
            resize_slice_(state, shape, group["state_dtype"] or self._value(p).dtype, local(p).device)
        stored = [local(self._state_tensor(p, group, state, key)) for key in MOMENT_KEYS]
        if stored[0].dtype != torch.uint8:
            return stored[0], stored[1], False
        m, v = (
            lowbit.decode_state(codes, self._state_tensor(p, group, state, ABSMAX_KEYS[key]), group["state_bits"],
                                MOMENT_SIGNED[key], shape)
            for key, codes in zip(MOMENT_KEYS, stored)
        )
        return m, v, True

    @staticmethod
    def _store_moments(group: dict[str, Any], state: dict[str, Any], moments: tuple[torch.Tensor, ...]) -> None:
        for key, value in zip(MOMENT_KEYS, moments):
            lowbit.encode_state_(state[key], state[ABSMAX_KEYS[key]], value, group["state_bits"], MOMENT_SIGNED[key])

    def _reset(self, p: torch.Tensor, state: dict[str, Any], moments: str = DEFAULT_RESET_MOMENTS) -> None:
        reset_state_(state, moments)
        if moments == "both":
            self._subsets.pop(p, None)  # a new period: a new subset

    def _step_foreach(self, params: list[torch.Tensor], group: dict[str, Any], grads: list[torch.Tensor]) -> None:
        """Plain AdamW (:func:`lowrank.optim.adam.adamw_foreach_`) of ``params``, in chunks of at
        most ``FOREACH_CHUNK_NUMEL`` elements of one (device, dtype, state dtype)."""
        buckets: dict[tuple[Any, ...], list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for p, grad in zip(params, grads):
            state = self.state[p]
            init_counters(state)
            for key in MOMENT_KEYS:
                self._state_tensor(p, group, state, key)
            if scheduled_reset_due(state, group["reset_interval"]):
                self._reset(p, state)
            state["step"] += 1
            state["total_step"] += 1
            buckets.setdefault((p.device, self._value(p).dtype, state["exp_avg"].dtype), []).append((p, grad))
        beta1, beta2 = group["betas"]
        for (_, _, s_dtype), bucket in buckets.items():
            grad_of = {id(p): grad for p, grad in bucket}
            for chunk in _chunks([p for p, _ in bucket], FOREACH_CHUNK_NUMEL):
                states = [self.state[p] for p in chunk]
                chunk_grads = [local(grad_of[id(p)]) for p in chunk]
                adamw_foreach_(
                    [local(self._value(p)) for p in chunk],  # FSDP2: the local shards (elementwise, no communication)
                    [g if g.dtype == s_dtype else g.to(s_dtype) for g in chunk_grads],
                    [local(s["exp_avg"]) for s in states],
                    [local(s["exp_avg_sq"]) for s in states],
                    [s["step"] for s in states],
                    [warmup_factor(s, group["reset_warmup"]) for s in states],
                    lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                )

    def _update(self, p: torch.Tensor, group: dict[str, Any], grad: torch.Tensor, pending: list) -> None:
        """One parameter with any combination of options (the class docstring gives the order).

        An FSDP2 matrix whose ``"svd"``/``"randomized"`` projector is due waits in ``pending`` to
        be refreshed with others (:meth:`_refresh_sharded`, which then finishes its step); the
        caller refreshes what is left in ``pending`` once it has looped.
        """
        state = self.state[p]
        grad = self._prepare(p, group, state, grad)
        if self._projector_due(p, group, state):
            shard = self._shard(p)
            if shard is not None and group["projection"] != "random":
                pending.append((p, grad))
                if len(pending) == shard.world:
                    self._refresh_sharded(group, pending)
                return
            self._store_projector(p, group, state, self._basis(p, group, state, grad))
        self._finish(p, group, state, grad)

    def _prepare(self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any], grad: torch.Tensor) -> torch.Tensor:
        """Steps 1–2: the scheduled reset, then Stable-SPAM on the gradient (its local rows under
        FSDP2, with the statistics of the whole tensor)."""
        init_counters(state)
        if scheduled_reset_due(state, group["reset_interval"]):
            self._reset(p, state)
        shard = self._shard(p)
        grad = local(grad).to(group["state_dtype"] or self._value(p).dtype)
        if not (group["adaptive_clip"] or group["norm_scaling"]):
            return grad
        stats = {key: self._state_tensor(p, group, state, key) for key, on in
                 (("max_abs_avg", group["adaptive_clip"]), ("norm_avg", group["norm_scaling"]),
                  ("norm_sq_avg", group["norm_scaling"])) if on}
        return stable_spam(grad, gammas=group["gammas"], step=state["total_step"] + 1, eps=group["eps"],
                           max_of=None if shard is None else shard.max, norm_of=None if shard is None else shard.norm,
                           **stats)

    def _finish(self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any], grad: torch.Tensor) -> None:
        """Steps 3–6 once the projector (if any) is current (:func:`lowrank.optim.update.adamw_update_`),
        on this rank's rows under FSDP2: here only what needs the state's home, the projected
        ``R``, the sparse subset, the (decoded) moments and the limiter's state."""
        shard = self._shard(p)
        matrix = p.dim() == 2
        low = grad
        if matrix and group["projection"] is not None:
            if shard is None:
                low = proj.project(grad, state["projector"])
            else:
                low = proj.project_rows(grad, state["projector"], p.shape, shard.start, shard.sum_)
        moment_input, indices = low, None
        if matrix and group["density"] < 1.0:
            numel = low.numel() if shard is None or replicated_moments(p.shape, group) else p.shape[0] * low.shape[1]
            indices = self._subset(p, group, state, numel)
            moment_input = sparse.gather(low, indices)
        exp_avg, exp_avg_sq, quantized = self._moments(p, group, state, moment_input.shape)
        if quantized:
            moment_input = moment_input.float()
        limited = matrix and (group["projection"] == "random" or group["residual"] is not None)
        limiter_norm = self._state_tensor(p, group, state, "limiter_norm") if limited else None
        adamw_update_(local(self._value(p)), grad, low, moment_input, exp_avg, exp_avg_sq, state, group,
                      shape=p.shape, indices=indices, limiter_norm=limiter_norm, shard=shard)
        if quantized:
            self._store_moments(group, state, (exp_avg, exp_avg_sq))

    # ------------------------------------------------------------------ projection refresh

    def _projector_due(self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> bool:
        due = projector_refresh_due(p, group, state)
        if due and "projector" not in state:
            state["projector_updates"] = 0
        return due

    def _basis(self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any], grad: torch.Tensor) -> torch.Tensor:
        """A new basis from the whole gradient ``grad`` (``"random"``: from the seed alone)."""
        seed = (group["seed"], self._index_map()[id(p)], state["projector_updates"])
        return proj.new_basis(group["projection"], grad, p.shape, group["rank"], seed=seed,
                              oversample=group["oversample"], power_iters=group["power_iters"])

    def _store_projector(self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any], basis: torch.Tensor) -> None:
        self._state_tensor(p, group, state, "projector").copy_(basis)
        state["projector_updates"] += 1

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
            p, _, _, _, whole_grad = job
            job[4] = None if whole_grad is None else self._basis(p, group, self.state[p], whole_grad)
        for p, grad, shard, owner, basis in jobs:
            if basis is None:
                basis = torch.empty(min(p.shape), proj.effective_rank(p.shape, group["rank"]), device=grad.device)
            shard.broadcast(basis, owner)
            state = self.state[p]
            self._store_projector(p, group, state, basis)
            self._finish(p, group, state, grad)
        pending.clear()

    # ------------------------------------------------------------------ sparse momentum

    def _subset(self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any], numel: int) -> torch.Tensor:
        """The current period's subset of the ``numel`` entries of the moment source (local flat
        indices: under FSDP2, of this rank's rows, this rank's slice of the global subset)."""
        period = state["resets"]
        cached = self._subsets.get(p)
        if cached is None or cached[0] != period:
            indices = self._draw_subset(p, group, period, numel)
            shard = self._shard(p)
            if shard is not None and sparse_rows(p.shape, group):
                indices = sparse.local_slice(indices, numel, shard)
            cached = (period, indices)
            self._subsets[p] = cached
        return cached[1]

    def _draw_subset(self, p: torch.Tensor, group: dict[str, Any], period: int, numel: int) -> torch.Tensor:
        return sparse.draw_subset(numel, group["density"], seed=group["seed"], index=self._index_map()[id(p)],
                                  period=period, device=local(p).device)

    # ------------------------------------------------------------------ FSDP2 (DTensor) parameters

    def _shard(self, p: torch.Tensor) -> RowShard | None:
        """Where ``p``'s local rows sit when it is an FSDP2 DTensor (cached); ``None`` otherwise."""
        key = id(p)
        if key not in self._shards:
            self._shards[key] = RowShard.of(p)
        return self._shards[key]

    def _subset_bounds(self, p: torch.Tensor, group: dict[str, Any], period: int, shard: RowShard) -> list[int]:
        """Where each rank's slice of period ``period``'s subset starts in the sorted subset, and its end."""
        numel = sparse.source_numel(p.shape, p.numel(), group)
        return shard.slice_bounds(self._draw_subset(p, group, period, numel), numel)

    @torch.no_grad()
    def _hold_local_state(self) -> None:
        """After loading: each FSDP2 parameter's state as this rank holds it (:func:`shard.hold_local_`)."""
        for group in self.param_groups:
            for p in group["params"]:
                state, shard = self.state.get(p), self._shard(p)
                if shard is not None and state:
                    numel = subset_size(sparse.source_numel(p.shape, p.numel(), group), group["density"])
                    hold_local_(state, p.shape, group, shard, local(p).device, numel,
                                lambda: self._subset_bounds(p, group, state["resets"], shard))
