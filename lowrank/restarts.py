"""One clock for every periodic event of a training run.

Low-rank pretraining has three things that happen "every T steps": the layers change
coordinates (balanced refactorization, or a ReLoRA merge into the base), the optimizer's moments
are reset because they refer to the old coordinates, and the learning rate restarts with a short
re-warm-up. Published code runs these on unrelated counters (the benchmark paper's refactor
events fire on a cycle unrelated to its LR schedule; SPAM's scripts pass the LR warm-up as the
reset warm-up). :class:`RestartController` owns the step counter, so all three happen on the same
step, and its state travels in the checkpoint.

Schedule: linear warm-up, cosine decay to ``min_lr_ratio``, and after each restart a linear
re-warm-up from 0 to the cosine envelope over ``rewarmup_steps`` (ReLoRA's "jagged cosine",
Lialin et al. 2023, arXiv 2307.05695, section 3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from .linalg import refactorization_maps, work_dtype
from .optim.reset import DEFAULT_RESET_MOMENTS, RESET_MOMENTS
from .optim.rotation import rotate_moment
from .wrap import lowrank_layers

__all__ = [
    "RestartController",
    "RestartEvent",
    "jagged_cosine",
    "reset_optimizer_momentum",
    "rotate_optimizer_momentum",
    "rotation_blocker",
    "EVENTS",
    "RESETS",
    "DEFAULT_EVENT",
    "DEFAULT_RESET",
    "DEFAULT_MIN_LR_RATIO",
]

EVENTS = ("auto", "refactorize", "merge", "none")
RESETS = ("changed", "factors", "all", "none")
DEFAULT_EVENT = "auto"
DEFAULT_RESET = "changed"
DEFAULT_MIN_LR_RATIO = 0.1


def jagged_cosine(
    step: int,
    *,
    total_steps: int,
    warmup_steps: int = 0,
    min_lr_ratio: float = DEFAULT_MIN_LR_RATIO,
    cycle_length: int | None = None,
    rewarmup_steps: int = 0,
) -> float:
    """Learning-rate multiplier for optimizer step ``step`` (0-based).

    ``(step + 1) / warmup_steps`` during the warm-up; then ``min + (1 - min)·½(1 + cos(π·p))``
    with ``p`` the progress after warm-up. After every ``cycle_length`` steps (a restart) the
    multiplier ramps linearly from ``1/rewarmup_steps`` of the envelope back to it.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    envelope = min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if cycle_length and rewarmup_steps and step >= cycle_length:
        since_restart = step % cycle_length
        if since_restart < rewarmup_steps:
            return envelope * (since_restart + 1) / rewarmup_steps
    return envelope


def reset_optimizer_momentum(optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor] | None = None,
                             moments: str = DEFAULT_RESET_MOMENTS) -> int:
    """Zero the moments of ``params`` (all when ``None``) and restart their bias correction.

    Uses the optimizer's own ``reset_momentum`` when it has one (:class:`lowrank.optim.ProjectedAdamW`
    restarts its warm-up ramp and sparse subsets too); for ``torch.optim.Adam``/``AdamW`` it
    zeroes ``exp_avg``/``exp_avg_sq`` and the step count in place (``moments="first"``: only
    ``exp_avg``, :data:`lowrank.optim.reset.RESET_MOMENTS`). Returns the number of parameters reset.
    """
    params = list(params) if params is not None else [p for group in optimizer.param_groups for p in group["params"]]
    if hasattr(optimizer, "reset_momentum"):
        optimizer.reset_momentum(params, moments)
        return len(params)
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        raise TypeError(
            f"cannot reset the momentum of {type(optimizer).__name__}: use lowrank.optim.ProjectedAdamW "
            "or torch.optim.AdamW, or set reset='none'"
        )
    for param in params:
        state = optimizer.state.get(param)
        if not state:
            continue
        for key in ("exp_avg",) if moments == "first" else ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            if key in state:
                state[key].zero_()
        if moments == "first":
            continue
        if torch.is_tensor(state["step"]):
            state["step"].zero_()
        else:
            state["step"] = 0
    return len(params)


def rotation_blocker(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> str | None:
    """Why :func:`rotate_optimizer_momentum` cannot carry ``param``'s moments, or ``None`` when it can."""
    if hasattr(optimizer, "rotation_blocker"):
        return optimizer.rotation_blocker(param)
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return f"{type(optimizer).__name__} has no moments lowrank knows how to map (use ProjectedAdamW or torch AdamW)"
    if any(group.get("amsgrad") for group in optimizer.param_groups if any(p is param for p in group["params"])):
        return "amsgrad's running maximum of v has no image in new coordinates"
    if _is_dtensor(param):
        return "it is FSDP2-sharded: a map mixes the rows of A across ranks"
    return None


@torch.no_grad()
def rotate_optimizer_momentum(optimizer: torch.optim.Optimizer, param: torch.Tensor, transform: torch.Tensor,
                              dim: int) -> None:
    """Carry ``param``'s Adam moments into coordinates where its gradient is ``G·T`` (``dim=1``) or
    ``T·G`` (``dim=0``), :func:`lowrank.optim.rotation.rotate_moment`; the optimizer's own
    ``rotate_momentum`` when it has one (:class:`lowrank.optim.ProjectedAdamW`), else torch
    Adam/AdamW's ``exp_avg``/``exp_avg_sq`` in place. The step count goes on."""
    if hasattr(optimizer, "rotate_momentum"):  # it checks its own layout (rotation_blocker)
        optimizer.rotate_momentum(param, transform, dim)
        return
    blocker = rotation_blocker(optimizer, param)
    if blocker is not None:
        raise ValueError(f"cannot carry the moments of a parameter of shape {tuple(param.shape)}: {blocker}")
    state = optimizer.state.get(param)
    if state and "exp_avg" in state:
        state["exp_avg"].copy_(rotate_moment(state["exp_avg"], transform, dim))
        state["exp_avg_sq"].copy_(rotate_moment(state["exp_avg_sq"], transform, dim, squared=True))


@dataclass
class RestartEvent:
    """What a restart did: for logs and tests."""

    step: int
    event: str
    layers: int
    reset_params: int
    mean_top_singular_value: float | None = None
    rotated_params: int = 0


class RestartController:
    """Keeps layer events, momentum resets and learning-rate restarts on one clock.

    Call :meth:`step` once after every ``optimizer.step()``. Every ``cycle_length`` steps it

    1. changes the layers' coordinates: ``refactorize`` (balanced SVD of ``B A``, Glentis et al.
       2025, arXiv 2505.22922) or ``merge`` (``W0 ← W0 + s·BA``, ReLoRA); ``auto`` merges layers
       that have a frozen base and refactorizes the others;
    2. resets the optimizer moments of exactly the parameters whose coordinates changed
       (``reset="changed"``), of every low-rank factor whether or not an event changed it
       (``"factors"``: momentum reset without refactorization, the benchmark paper's ablation),
       of every parameter (``"all"``, SPAM's periodic reset) or of none;
    3. restarts the learning rate: a ``rewarmup_steps`` linear ramp inside the cosine envelope.

    With ``rotate_moments`` the moments a reset keeps (``v`` with ``reset_moments="first"``, both
    with ``reset="none"``) are carried into each refactorized layer's new coordinates
    (:mod:`lowrank.optim.rotation`) instead of staying in the old ones; a layer whose product has
    lost rank has no such map (:func:`lowrank.linalg.refactorization_maps`) and its factors' moments
    are reset in full. A merge re-initialises the factors, so there is nothing to carry there.

    It also sets each parameter group's ``lr`` before every step (``base_lr × jagged_cosine``),
    so no separate LR scheduler can drift from the event clock; :meth:`lr_lambda` gives the same
    multiplier to code that needs an LR scheduler object (e.g. Hugging Face ``Trainer``).

    Under FSDP2 (``lowrank.distributed.fsdp.shard_model``: the factors are DTensor shards) each
    layer's event is computed once from its gathered factors on an owner rank and broadcast
    (:func:`lowrank.distributed.fsdp.sharded_layer_events`). Under DDP (plain tensors) every rank
    computes the event and the changed factors are broadcast from rank 0 after each event,
    so every rank holds bit-identical weights whatever its LAPACK threads did.

    Args:
        model: the (possibly DDP-wrapped or compiled) model.
        optimizer: any optimizer; momentum resets need ``reset_momentum`` or torch Adam/AdamW.
        total_steps: length of the run in optimizer steps (for the cosine envelope).
        cycle_length: steps between restarts (200 is the benchmark paper's best); ``None``
            disables restarts and leaves a plain warm-up + cosine schedule.
        event: one of :data:`EVENTS`.
        reset: one of :data:`RESETS`.
        reset_moments: what a reset clears (:data:`lowrank.optim.reset.RESET_MOMENTS`).
        rotate_moments: carry the kept moments through refactorizations (above).
        warmup_steps: initial linear warm-up.
        rewarmup_steps: linear re-warm-up after each restart (0: none).
        min_lr_ratio: floor of the cosine, as a fraction of the base learning rate.
        manage_lr: set the learning rate of the parameter groups (turn off when an external
            scheduler owns it and uses :meth:`lr_lambda`).
        start_step: where the clock starts (a training phase that begins mid-run, e.g. after
            a dense warm start); ``load_state_dict`` sets it on resume.

    The clock, ``num_steps``, counts optimizer steps done: the run's step. (It is not the
    optimizer's own per-parameter counts: ProjectedAdamW's ``step`` is Adam's bias-correction
    count since that parameter's last reset, its ``total_step`` the parameter's steps overall.)
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        total_steps: int,
        cycle_length: int | None = 200,
        event: str = DEFAULT_EVENT,
        reset: str = DEFAULT_RESET,
        reset_moments: str = DEFAULT_RESET_MOMENTS,
        rotate_moments: bool = False,
        warmup_steps: int = 0,
        rewarmup_steps: int = 0,
        min_lr_ratio: float = DEFAULT_MIN_LR_RATIO,
        manage_lr: bool = True,
        start_step: int = 0,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"RestartController(model=...) needs a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"RestartController(optimizer=...) needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
        for name, value in (("total_steps", total_steps), ("cycle_length", cycle_length), ("warmup_steps", warmup_steps),
                            ("rewarmup_steps", rewarmup_steps), ("start_step", start_step)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise TypeError(f"RestartController({name}=...) must be a whole number of steps, got {value!r}")
        if event not in EVENTS:
            raise ValueError(f"event must be one of {', '.join(EVENTS)}, got {event!r}")
        if reset not in RESETS:
            raise ValueError(f"reset must be one of {', '.join(RESETS)}, got {reset!r}")
        if reset_moments not in RESET_MOMENTS:
            raise ValueError(f"reset_moments must be one of {', '.join(RESET_MOMENTS)}, got {reset_moments!r}")
        if cycle_length is not None and cycle_length <= 0:
            raise ValueError(f"cycle_length must be a positive number of steps or None, got {cycle_length!r}")
        if total_steps is None or total_steps <= 0:
            raise ValueError(f"RestartController(total_steps=...) must be the run's length, a positive whole number of "
                             f"steps, got {total_steps!r}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        if warmup_steps < 0 or rewarmup_steps < 0 or start_step < 0:
            raise ValueError("warmup_steps, rewarmup_steps and start_step must be >= 0")
        if warmup_steps > total_steps:
            raise ValueError(f"warmup_steps ({warmup_steps}) is longer than the run (total_steps={total_steps}): the "
                             "learning rate would never reach its peak; shorten the warm-up or raise total_steps")
        if cycle_length is not None and rewarmup_steps >= cycle_length:
            raise ValueError(f"rewarmup_steps ({rewarmup_steps}) must be shorter than cycle_length ({cycle_length})")
        self.model = model
        self.optimizer = optimizer
        self.total_steps = total_steps
        self.cycle_length = cycle_length
        self.event = event
        self.reset = reset
        self.reset_moments = reset_moments
        self.rotate_moments = bool(rotate_moments)
        self.warmup_steps = warmup_steps
        self.rewarmup_steps = rewarmup_steps
        self.min_lr_ratio = min_lr_ratio
        self.manage_lr = manage_lr
        self.num_steps = int(start_step)
        self.num_restarts = sum(self.is_restart_step(step) for step in range(1, self.num_steps + 1))
        self.history: list[RestartEvent] = []
        layers = lowrank_layers(model)
        if event in ("refactorize", "merge") and not layers:
            raise ValueError(f"event={event!r} needs a wrapped model (lowrank.wrap); this model has no LowRankLinear layers")
        if reset == "factors" and not layers:
            raise ValueError("reset='factors' needs a wrapped model (lowrank.wrap); this model has no LowRankLinear layers")
        if event == "merge" and any(layer.base_weight is None for layer in layers.values()):
            raise ValueError("event='merge' needs layers with a frozen base: wrap with LowRankConfig(keep_base=True)")
        if rotate_moments:
            self._check_rotation(layers)
        for group in optimizer.param_groups:
            group.setdefault("base_lr", group["lr"])
        self._apply_lr()

    def _check_rotation(self, layers: dict[str, nn.Module]) -> None:
        """``rotate_moments`` needs refactorizations, kept moments and maps the optimizer can apply."""
        if self.event in ("merge", "none"):
            raise ValueError(f"rotate_moments carries moments through refactorizations, and event={self.event!r} "
                             "has none: use event='refactorize' (or 'auto' on layers without a frozen base)")
        if self.reset != "none" and self.reset_moments == "both":
            raise ValueError("rotate_moments carries the moments a reset keeps, and reset_moments='both' keeps none: "
                             "set reset_moments='first' (reset m, carry v) or reset='none' (carry both)")
        for name, layer in layers.items():
            if self._kind(layer) != "refactorize":
                continue
            for param in layer.factor_parameters():
                blocker = rotation_blocker(self.optimizer, param) if param.requires_grad else None
                if blocker is not None:
                    raise ValueError(f"rotate_moments: cannot carry the moments of {name}'s factors: {blocker}; "
                                     "turn rotate_moments off")

    def _kind(self, layer: nn.Module) -> str:
        """The event a layer gets: ``merge`` or ``refactorize``."""
        return "merge" if self.event == "merge" or (self.event == "auto" and layer.base_weight is not None) else "refactorize"

    # ------------------------------------------------------------------ schedule

    def lr_lambda(self, step: int) -> float:
        """The learning-rate multiplier for optimizer step ``step`` (0-based)."""
        return jagged_cosine(
            step,
            total_steps=self.total_steps,
            warmup_steps=self.warmup_steps,
            min_lr_ratio=self.min_lr_ratio,
            cycle_length=self.cycle_length,
            rewarmup_steps=self.rewarmup_steps,
        )

    def _apply_lr(self) -> None:
        if not self.manage_lr:
            return
        multiplier = self.lr_lambda(self.num_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * multiplier

    # ------------------------------------------------------------------ events

    def is_restart_step(self, step: int) -> bool:
        """Whether a restart follows optimizer step number ``step`` (1-based count of steps done)."""
        return bool(self.cycle_length) and step % self.cycle_length == 0 and step < self.total_steps

    def step(self) -> RestartEvent | None:
        """Advance the clock by one optimizer step; run a restart when one is due."""
        self.num_steps += 1
        record = self.restart() if self.is_restart_step(self.num_steps) else None
        self._apply_lr()
        return record

    @torch.no_grad()
    def restart(self) -> RestartEvent:
        """Run the layer event and the momentum reset now (also callable by hand)."""
        # event "none": only the momentum reset (e.g. SPAM's periodic reset on a dense model).
        layers = lowrank_layers(self.model) if self.event != "none" else {}
        changed: list[torch.Tensor] = []
        top_singular_values = []
        event = None
        kinds = {name: self._kind(layer) for name, layer in layers.items()}
        # rotate_moments: each refactorized layer's gradient maps (r×r), from its factors before and after
        maps: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        # FSDP2 layers (DTensor factors): gathered, computed once on an owner rank, broadcast and
        # written back as shards, all layers in one pass (lowrank.distributed.fsdp).
        sharded = [name for name, layer in layers.items() if _is_dtensor(layer.A)]
        results = {}
        if sharded:
            from .distributed.fsdp import sharded_layer_events

            outcomes = sharded_layer_events([(layers[name], kinds[name]) for name in sharded])
            results = dict(zip(sharded, outcomes))
        for name, layer in layers.items():
            if kinds[name] == "merge":
                if name not in results:
                    layer.merge()
                event = "merge" if event in (None, "merge") else "mixed"
            else:
                before = (layer.B.detach().clone(), layer.A.detach().clone()) if self.rotate_moments else None
                sigma = results[name] if name in results else layer.refactorize()
                if before is not None:
                    maps[name] = _defined_maps(refactorization_maps(*before, layer.B, layer.A), layer.A)
                top_singular_values.append(float(sigma[0]))
                event = "refactorize" if event in (None, "refactorize") else "mixed"
            changed.extend(layer.factor_parameters())
            if layer.base_weight is not None:
                changed.append(layer.base_weight)
        # DDP (plain tensors): every rank computed the event; make them bit-identical.
        # ...and the maps and whether each exists, so all ranks carry (or reset) the same moments the same way
        _broadcast_from_rank0([p for p in changed if not _is_dtensor(p)] + [t for triple in maps.values() for t in triple])
        if self.reset in ("changed", "factors"):
            if self.reset == "factors":
                changed = [p for layer in lowrank_layers(self.model).values() for p in layer.factor_parameters()]
            trainable = [p for p in changed if p.requires_grad]
            reset_count = reset_optimizer_momentum(self.optimizer, trainable, self.reset_moments) if trainable else 0
        elif self.reset == "all":
            reset_count = reset_optimizer_momentum(self.optimizer, moments=self.reset_moments)
        else:
            reset_count = 0
        rotated_count = 0
        for name, (b_map, a_map, defined) in maps.items():
            layer = layers[name]
            trainable = [p for p in layer.factor_parameters() if p.requires_grad]
            if not bool(defined):  # the product lost rank: the new coordinates have no map from the old ones
                reset_optimizer_momentum(self.optimizer, trainable, "both")
                continue
            for param, transform, dim in ((layer.B, b_map, 1), (layer.A, a_map, 0)):
                if param.requires_grad:
                    rotate_optimizer_momentum(self.optimizer, param, transform, dim)
                    rotated_count += 1
        record = RestartEvent(
            step=self.num_steps,
            event=event or "none",
            layers=len(layers),
            reset_params=reset_count,
            mean_top_singular_value=sum(top_singular_values) / len(top_singular_values) if top_singular_values else None,
            rotated_params=rotated_count,
        )
        self.history.append(record)
        self.num_restarts += 1
        return record

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict:
        """Plain numbers only (``torch.load(weights_only=True)`` reads it)."""
        return {"num_steps": self.num_steps, "num_restarts": self.num_restarts}

    def load_state_dict(self, state: dict) -> None:
        """Restore the clock from :meth:`state_dict`."""
        steps = state.get("num_steps") if isinstance(state, dict) else None
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"RestartController.load_state_dict: expected {{'num_steps': int >= 0, 'num_restarts': int}} "
                             f"(a RestartController.state_dict()), got {state!r}")
        self.num_steps = steps
        self.num_restarts = int(state.get("num_restarts", 0))
        self._apply_lr()


def _defined_maps(pair: tuple[torch.Tensor, torch.Tensor] | None, like: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(b_map, a_map, defined)``: a layer's maps with a 0-dim flag, zeros where they do not exist,
    so every rank broadcasts the same tensors whatever its own rank test decided."""
    if pair is not None:
        return pair[0], pair[1], torch.ones((), device=like.device)
    rank, dtype = like.shape[0], work_dtype(like.dtype)
    zeros = torch.zeros(rank, rank, dtype=dtype, device=like.device)
    return zeros, zeros.clone(), torch.zeros((), device=like.device)


def _is_dtensor(tensor: torch.Tensor) -> bool:
    return isinstance(tensor, DTensor)


def _broadcast_from_rank0(tensors: list[torch.Tensor]) -> None:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for tensor in tensors:
        dist.broadcast(tensor.data, src=0)
