"""``transformers.Trainer`` integration: the restart controller as a callback, and a method
preset's optimizer for the Trainer. ::

    from transformers import Trainer
    from lowrank.methods import apply_method, load_method
    from lowrank.integrations import LowRankCallback, optimizer_cls_and_kwargs

    method = load_method("low_rank_restarts", {"lowrank.rank": 64})
    apply_method(model, method)                  # or lowrank.wrap(model, LowRankConfig(...))
    trainer = Trainer(model, args, train_dataset=dataset,
                      optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(method),
                      callbacks=[LowRankCallback(method)])

How this fits the loop of transformers 5 (``Trainer._run_epoch``): after the
``gradient_accumulation_steps`` micro-batches of one optimizer step it runs ``optimizer.step()``,
``lr_scheduler.step()``, ``zero_grad()``, ``state.global_step += 1``, the callbacks'
``on_step_end``, then logging, saving and evaluation. Hence:

* **Events.** ``on_step_end`` advances the controller by one step, once per optimizer step
  whatever the accumulation. Every ``cycle_length`` steps it refactorizes or merges the layers
  and resets the moments of exactly the changed parameters, before that step's checkpoint is
  written.
* **Learning rate: one schedule, one clock.** The callback points the Trainer's ``LambdaLR`` (what
  ``get_scheduler`` builds for every ``lr_scheduler_type`` but plateau/greedy, and what
  :func:`create_optimizer_and_scheduler` returns) at ``controller.lr_lambda``, the jagged cosine;
  the controller itself leaves the LR alone (``manage_lr=False``). The scheduler's step count, the
  controller's and ``state.global_step`` are one number: the callback checks it every step and
  realigns the scheduler after a step that the grad scaler skipped (the Trainer then does not step
  the scheduler). ``TrainingArguments.lr_scheduler_type`` and ``warmup_*`` are not used: the
  method's ``schedule`` section and ``restarts.rewarmup_steps`` are.
* **Resume.** The Trainer reloads ``optimizer.pt`` with ``torch.load(weights_only=True)``
  (``ProjectedAdamW``'s state is tensors and numbers only) and ``scheduler.pt`` (its step count).
  The callback is an ``ExportableState``: its clock goes into ``trainer_state.json``
  (``stateful_callbacks``) with every checkpoint, and ``on_train_begin`` reads it back from the
  resumed state, whether or not ``restore_callback_states_from_checkpoint`` is set.
* **Optimizer.** :func:`optimizer_cls_and_kwargs` returns a factory, not an ``Optimizer``
  subclass; transformers 5 calls ``factory()(model, **kwargs)`` for those
  (``Trainer.create_optimizer``, ``is_optimizer_factory``), so the preset's parameter groups are
  built from the model exactly as ``lowrank pretrain`` builds them
  (:func:`lowrank.methods.param_groups`). The preset's ``lr``, betas and weight decay are used;
  ``TrainingArguments.learning_rate``, ``adam_*`` and ``weight_decay`` are not (a warning says so
  when ``learning_rate`` differs): override the preset instead (``{"optimizer.lr": 3e-3}``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from transformers import TrainerCallback, TrainingArguments
from transformers.trainer_callback import ExportableState
from transformers.utils import logging

from ..methods import Method, build_controller, build_optimizer, load_method
from ..restarts import RestartController, RestartEvent
from ..wrap import unwrap_model, lowrank_layers

__all__ = ["LowRankCallback", "LowRankOptimizerFactory", "optimizer_cls_and_kwargs", "create_optimizer_and_scheduler"]

logger = logging.get_logger(__name__)

MethodLike = str | Path | Method | dict


def resolve_method(method: MethodLike, overrides: dict[str, Any] | None = None) -> Method:
    """A :class:`~lowrank.methods.Method` from a preset name, a YAML path, a ``Method``, or a
    ``Method.to_dict()`` (as saved in checkpoints), with dotted-key ``overrides`` applied
    (:meth:`~lowrank.methods.Method.with_overrides`)."""
    if isinstance(method, (str, Path)):
        return load_method(method, overrides)
    if isinstance(method, dict):
        method = Method(**method)
    if isinstance(method, Method):
        return method.with_overrides(overrides)
    raise TypeError(f"method must be a preset name, a YAML path, a lowrank.methods.Method or its dict, got {type(method).__name__}")


def _check_model(model: nn.Module, method: Method, who: str) -> None:
    """Refuse a model that the method cannot act on, with the fix in the message."""
    if method.training.layerwise_step:
        raise ValueError(
            f"{who}: method {method.name} has training.layerwise_step=true: the optimizer step inside backward is a "
            "`lowrank pretrain` feature (the Trainer owns backward, accumulation, clipping and optimizer.step()); "
            "set training.layerwise_step=false with the Trainer, or train with lowrank pretrain --layerwise-step"
        )
    if method.warm_start_steps:
        raise ValueError(
            f"{who}: method {method.name} has lowrank.warm_start_steps={method.warm_start_steps}: the dense warm "
            "start is a `lowrank pretrain` feature; with the Trainer, train the dense model first, then wrap it "
            "and train again, with lowrank.warm_start_steps=0"
        )
    if lowrank_layers(model):
        return
    restarts = method.restarts
    if method.lowrank:
        why = "trains low-rank factors (it has a lowrank section)"
    elif restarts and (restarts.event in ("refactorize", "merge") or (restarts.event == "auto" and restarts.reset == "changed")):
        why = f"runs restarts.event={restarts.event!r}, which acts on LowRankLinear layers"
    elif restarts and restarts.reset == "factors":
        why = "runs restarts.reset='factors', which resets the moments of LowRankLinear factors"
    else:
        return  # a dense method (e.g. SPAM's periodic reset of every moment) is fine on a dense model
    raise ValueError(
        f"{who}: method {method.name} {why}, but the model has no LowRankLinear layers: call "
        "lowrank.wrap(model, LowRankConfig(...)) or lowrank.methods.apply_method(model, method) before creating the Trainer"
    )


def _unwrap_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    # accelerate's AcceleratedOptimizer (what the Trainer holds after `prepare`) keeps the real
    # optimizer in `.optimizer` and does not forward `reset_momentum`.
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def _as_function(lr_lambda: Callable[[int], float]) -> Callable[[int], float]:
    # A plain function, so that LambdaLR.state_dict() stores None for it: scheduler.pt then holds
    # numbers only (loadable with weights_only=True) and nothing of the controller.
    def lr_lambda_fn(step: int) -> float:
        return lr_lambda(step)

    return lr_lambda_fn


def _set_scheduler_step(scheduler: LambdaLR, step: int) -> None:
    """Put ``scheduler`` at optimizer step ``step`` and set the LRs it gives (closed form)."""
    scheduler.last_epoch = step
    values = [base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, values):
        group["lr"] = lr
    scheduler._last_lr = values  # what get_last_lr() (and so the Trainer's logged LR) returns


class LowRankOptimizerFactory:
    """An optimizer factory in the sense of transformers 5: ``Trainer.create_optimizer`` calls
    ``LowRankOptimizerFactory()(model, method=..., seed=...)``. Builds the preset's optimizer
    (:func:`lowrank.methods.build_optimizer`) over the model's parameter groups."""

    def __call__(self, model: nn.Module, *, method: MethodLike, seed: int = 0) -> torch.optim.Optimizer:
        method = resolve_method(method)
        model = unwrap_model(model)
        _check_model(model, method, "optimizer_cls_and_kwargs")
        return build_optimizer(model, method, seed=seed)


def optimizer_cls_and_kwargs(
    method: MethodLike, *, overrides: dict[str, Any] | None = None, seed: int = 0
) -> tuple[type, dict[str, Any]]:
    """``Trainer(..., optimizer_cls_and_kwargs=optimizer_cls_and_kwargs("low_rank_restarts"))``.

    Returns ``(LowRankOptimizerFactory, {"method": Method, "seed": seed})``; the Trainer builds the
    optimizer from its model when training starts. The method is resolved (and validated) now.
    """
    return LowRankOptimizerFactory, {"method": resolve_method(method, overrides), "seed": seed}


def create_optimizer_and_scheduler(
    model: nn.Module,
    method: MethodLike,
    *,
    total_steps: int,
    overrides: dict[str, Any] | None = None,
    seed: int = 0,
) -> tuple[torch.optim.Optimizer, LambdaLR]:
    """``Trainer(..., optimizers=create_optimizer_and_scheduler(model, method, total_steps=N))``.

    The preset's optimizer and a ``LambdaLR`` following its jagged cosine over ``total_steps``
    (which must equal the Trainer's ``max_steps``; :class:`LowRankCallback` checks it and then
    drives the same scheduler from its controller).
    """
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps <= 0:
        # checked first: the schedule would otherwise blame its warm-up for a run of no steps
        raise ValueError(f"create_optimizer_and_scheduler(total_steps=...) must be the Trainer's max_steps, a positive whole "
                         f"number, got {total_steps!r}")
    method = resolve_method(method, overrides)
    optimizer = LowRankOptimizerFactory()(model, method=method, seed=seed)
    # The controller is the one place where a preset becomes a schedule; this one only lends its
    # lr_lambda (no events), the callback builds the one that runs.
    schedule = build_controller(model, optimizer, method, total_steps=total_steps, manage_lr=False, layer_events=False)
    scheduler = LambdaLR(optimizer, _as_function(schedule.lr_lambda))
    scheduler.lowrank_total_steps = int(total_steps)
    return optimizer, scheduler


class LowRankCallback(TrainerCallback, ExportableState):
    """Runs a method's :class:`~lowrank.restarts.RestartController` inside ``transformers.Trainer``.

    At ``on_train_begin`` it builds the controller over the Trainer's model and optimizer (the
    Trainer passes both to callbacks) for ``state.max_steps`` steps, restores its clock on a
    resumed run, and takes over the Trainer's LR scheduler (see the module docstring). At every
    ``on_step_end`` it advances the controller: layer event + momentum reset every
    ``cycle_length`` steps, LR restart through the scheduler. ``events`` lists what happened.

    Args:
        method: preset name, YAML path, :class:`~lowrank.methods.Method` or its dict; the same
            one the optimizer was built from.
        overrides: dotted-key preset overrides (with a name or path).
        lr_schedule: drive the Trainer's scheduler with the controller's jagged cosine. ``False``
            leaves your scheduler alone (events and resets still run; LR restarts are then yours).

    Raises (``ValueError``, at ``Trainer(...)`` and at ``train()``): the method needs
    ``LowRankLinear`` layers and the model has none (wrap it first), its restart event does not fit
    the layers (``merge`` without a frozen base), or the Trainer's scheduler is not a ``LambdaLR``.
    """

    def __init__(self, method: MethodLike, overrides: dict[str, Any] | None = None, *, lr_schedule: bool = True) -> None:
        self.method = resolve_method(method, overrides)
        self.lr_schedule = bool(lr_schedule)
        self.controller: RestartController | None = None
        self.events: list[RestartEvent] = []
        # Set by the Trainer when restore_callback_states_from_checkpoint=True (see state()).
        self.clock: dict[str, int] | None = None

    # ------------------------------------------------------------------ ExportableState

    def state(self) -> dict:
        """``args`` rebuild the callback, ``attributes`` hold the clock: plain JSON for ``trainer_state.json``."""
        if self.controller is not None:
            clock = self.controller.state_dict()
        else:
            clock = dict(self.clock or {"num_steps": 0, "num_restarts": 0})
        return {"args": {"method": self.method.to_dict(), "lr_schedule": self.lr_schedule}, "attributes": {"clock": clock}}

    def _resumed_clock(self, state) -> dict[str, int]:
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        if isinstance(saved, list):
            raise ValueError("the checkpoint holds several LowRankCallback states: attach exactly one LowRankCallback")
        clock = ((saved or {}).get("attributes") or {}).get("clock") or self.clock
        if clock is None:
            # A checkpoint written without this callback: its clock is the Trainer's step count.
            steps = state.global_step
            restarts = sum(self.controller.is_restart_step(s) for s in range(1, steps + 1))
            clock = {"num_steps": steps, "num_restarts": restarts}
        if int(clock["num_steps"]) != state.global_step:
            raise ValueError(
                f"LowRankCallback: the checkpoint's restart clock is at step {clock['num_steps']} but the Trainer resumes "
                f"at step {state.global_step}; the checkpoint's trainer_state.json is inconsistent"
            )
        return clock

    # ------------------------------------------------------------------ events

    def on_init_end(self, args, state, control, model=None, **kwargs):
        if model is not None:  # None with model_init: checked again at train begin
            _check_model(model, self.method, "LowRankCallback")

    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        if model is None or optimizer is None:
            raise RuntimeError("LowRankCallback needs the Trainer's model and optimizer at on_train_begin")
        _check_model(model, self.method, "LowRankCallback")
        self.controller = build_controller(model, _unwrap_optimizer(optimizer), self.method, total_steps=state.max_steps, manage_lr=False)
        if state.global_step:
            self.controller.load_state_dict(self._resumed_clock(state))
        self.events = [event for event in self.events if event.step <= state.global_step]
        if self.lr_schedule:
            self._take_over_scheduler(lr_scheduler, args, state)
        self._warn_about_ignored_arguments(args)

    def on_step_end(self, args, state, control, lr_scheduler=None, **kwargs):
        controller = self.controller
        if controller is None:
            raise RuntimeError("LowRankCallback.on_step_end before on_train_begin: attach the callback before training")
        if controller.num_steps != state.global_step - 1:
            raise RuntimeError(
                f"LowRankCallback: the restart clock is at step {controller.num_steps} but the Trainer finished step "
                f"{state.global_step}; was the callback added in the middle of training?"
            )
        record = controller.step()
        if record is not None:
            self.events.append(record)
            logger.info(f"lowrank: step {record.step}: {record.event} of {record.layers} layers, {record.reset_params} moments reset")
        if self.lr_schedule and lr_scheduler is not None and lr_scheduler.last_epoch != state.global_step:
            # The grad scaler skipped this optimizer step, so the Trainer did not step the scheduler.
            _set_scheduler_step(lr_scheduler, state.global_step)

    # ------------------------------------------------------------------ helpers

    def _take_over_scheduler(self, scheduler, args: TrainingArguments, state) -> None:
        if not isinstance(scheduler, LambdaLR):
            raise ValueError(
                f"LowRankCallback drives the learning rate through the Trainer's scheduler, which must be a torch "
                f"LambdaLR; got {type(scheduler).__name__} (lr_scheduler_type={args.lr_scheduler_type!r}). Use the "
                "default lr_scheduler_type, pass optimizers=create_optimizer_and_scheduler(...), or "
                "LowRankCallback(..., lr_schedule=False) to keep your scheduler"
            )
        planned = getattr(scheduler, "lowrank_total_steps", None)
        if planned is not None and planned != state.max_steps:
            raise ValueError(
                f"create_optimizer_and_scheduler(total_steps={planned}) but the Trainer runs {state.max_steps} steps; "
                "pass total_steps=args.max_steps"
            )
        scheduler.lr_lambdas = [_as_function(self.controller.lr_lambda)] * len(scheduler.optimizer.param_groups)
        _set_scheduler_step(scheduler, state.global_step)

    def _warn_about_ignored_arguments(self, args: TrainingArguments) -> None:
        default_lr = TrainingArguments.__dataclass_fields__["learning_rate"].default
        method_lr = self.method.optimizer.lr
        if args.learning_rate not in (default_lr, method_lr):
            logger.warning(
                f"TrainingArguments.learning_rate={args.learning_rate} is not used: with a lowrank optimizer the "
                f"learning rate is method {self.method.name}'s optimizer.lr={method_lr} (override it in the method)"
            )
        clip = self.method.training.grad_clip or 0.0
        if float(clip) != float(args.max_grad_norm or 0.0):
            logger.warning(
                f"method {self.method.name} clips gradients at {clip} but TrainingArguments.max_grad_norm="
                f"{args.max_grad_norm}; the Trainer's value is used"
            )
