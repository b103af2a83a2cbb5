"""The training loop of ``lowrank pretrain``: one process or ``torchrun`` DDP.

In the spirit of nanoGPT's ``train.py``, one screen per part:

* **set-up** (:meth:`Trainer.__init__`): config checks, process group, run folder policy, the
  method (parsed once, overrides applied), data, model, the run's phases, then the phase the run
  starts in, and the checkpoint it resumes from.
* **phases** (:func:`plan_phases`, :meth:`Trainer._enter`): a run is one phase, or two when the
  method has a dense warm start (ReLoRA): ``warm start`` trains the dense model, then ``train``
  factorizes it (``W0`` = the trained weight, ``B = 0``: the function is unchanged) and carries
  the other parameters' optimizer state over. Entering a phase builds its optimizer and a
  controller whose clock starts at the phase's first step; nothing is rewound by hand.
* **the loop** (:meth:`Trainer.train`): for each step, ``grad_accum`` micro-batches, clip,
  ``optimizer.step()`` (skipped when the gradient is not finite, :mod:`.health`),
  ``controller.step()`` (restarts + LR), log; at a phase's end, enter the next; evaluate;
  checkpoint (only a finite state: a diverged step never becomes ``latest``).

Words: the *run's step* (``Trainer.step``) counts optimizer steps done and equals the restart
controller's clock (``controller.num_steps``). Every source of randomness after start-up is a
function of the seed and the step, and checkpoints hold the data position, so a resumed run
reproduces the uninterrupted one bit for bit.
"""

from __future__ import annotations

import collections
import gc
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from .. import accounting
from ..checkpointing import check_activation_checkpointing
from ..data import build_data
from ..distributed import Heartbeat, end_process_group, init_distributed, is_comm_failure, parameter_hash, stalled_message
from ..distributed.strategy import check_comm, make_strategy
from ..dtypes import dtype_name
from ..errors import UsageError
from ..methods import (apply_method, build_controller, build_method_model, build_optimizer, dense_adamw_override, load_method,
                       param_groups)
from ..models import build_model, load_model_config
from ..precision import compute_dtype, param_dtype
from ..wrap import count_parameters, is_wrapped
from .checkpoint import checkpoint_step, list_checkpoints
from .config import TrainConfig, autocast_for, total_steps, validate_config
from .folder import CheckpointMeta, RunFolder, structural_differences
from .health import StepHealth, StopTraining, first_nonfinite
from .layerwise import LayerwiseStep
from .metrics import MetricsLogger
from .step import optimizer_step, prepare_model

__all__ = ["Phase", "plan_phases", "Trainer", "pretrain"]


@dataclass(frozen=True)
class Phase:
    """Steps ``[start, end)`` of a run; ``dense``: the method's layers are not applied yet."""

    name: str
    start: int
    end: int
    dense: bool


def plan_phases(warm_start_steps: int, total: int) -> list[Phase]:
    """``[warm start, train]`` for a method with a dense warm start that ends inside the run,
    else ``[train]``; a run shorter than its warm start is all warm start."""
    warm = min(warm_start_steps, total)
    if warm == 0:
        return [Phase("train", 0, total, dense=False)]
    if warm == total:
        return [Phase("warm start", 0, total, dense=True)]
    return [Phase("warm start", 0, warm, dense=True), Phase("train", warm, total, dense=False)]


class Trainer:
    """One training run: model, optimizer, controller, data and logs."""

    def __init__(self, cfg: TrainConfig) -> None:
        validate_config(cfg)
        self.cfg = cfg
        self.dist, self.device = init_distributed(cfg.device, cfg.dist_timeout, always_group=cfg.strategy == "fsdp2")
        self.heartbeat = Heartbeat(self.dist)
        self.folder = RunFolder(cfg.run_dir())
        # The policy is applied (and --resume read) before anything is written.
        self.resume = self.folder.open(resume=cfg.resume, overwrite=cfg.overwrite, world_size=self.dist.world_size)
        self._resolve_method()
        self.data = self._build_data()
        if self.resume is not None:
            self._check_resumable()
        self.phases = plan_phases(self.method.warm_start_steps, self.total_steps)
        training = self.method.training
        self.health = StepHealth(training.nonfinite_grads, training.max_skipped_steps, training.dead_steps)
        self.step = self.resume.step if self.resume else 0
        # Layer by layer in the storage dtype, factorized as built: never the dense fp32 model whole
        # (a LLaMA-7B shape is 25 GiB so); the same values as building it dense and wrapping it.
        self.model = build_method_model(self.model_config, self.method, seed=cfg.seed, dtype=self.param_dtype,
                                        device=self.device, lowrank=not self.phase_at(self.step).dense)
        self.optimizer: torch.optim.Optimizer | None = None
        self.layerwise: LayerwiseStep | None = None
        self._enter(self.phase_at(self.step), carry_state=False)
        if self.resume is not None:
            self._restore()

    def _resolve_method(self) -> None:
        """The method (parsed once, overrides applied), the strategy, the model config and the run's
        length, with every check that needs them, before any data work."""
        cfg = self.cfg
        self.method = load_method(cfg.method).with_overrides(cfg.overrides, rank=cfg.rank, lr=cfg.lr,
                                                             cycle_length=cfg.cycle_length)
        check_comm(cfg.comm, cfg.strategy, self.method)
        self.activation_checkpointing = cfg.activation_checkpointing or self.method.training.activation_checkpointing
        self.layerwise_step = cfg.layerwise_step or self.method.training.layerwise_step
        self.param_dtype = param_dtype(cfg.param_dtype or self.method.training.param_dtype)
        self.method = self.method.with_overrides(dense_adamw_override(self.method.optimizer.name, self.param_dtype, None,
                                                                       per_parameter=self.layerwise_step))
        self.autocast, self.precision = autocast_for(self.device, cfg.precision, self.param_dtype)
        dtype, autocast = compute_dtype(self.device, self.param_dtype, cfg.precision)
        # the dtype the layers compute in from their stored weights (autocast casts inside the ops instead)
        self.compute_dtype = self.param_dtype if autocast else dtype
        self.strategy = make_strategy(cfg.strategy, self.dist, self.device, comm=cfg.comm, precision=self.precision)
        self._check_per_parameter_step()
        self._check_storage()
        self._check_layerwise()
        if self.strategy.sharded and self.method.warm_start_steps:
            raise UsageError("--strategy fsdp2 does not run a dense warm start (lowrank.warm_start_steps): the model would "
                             "be re-wrapped while sharded; set lowrank.warm_start_steps=0 or use --strategy ddp")
        self.model_config = load_model_config(cfg.model)
        limit = getattr(self.model_config, "max_position_embeddings", cfg.seq_len)
        if cfg.seq_len > limit:
            raise UsageError(f"--seq-len {cfg.seq_len} exceeds the model's max_position_embeddings ({limit})")
        self.tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * self.dist.world_size
        self.total_steps = total_steps(cfg, self.tokens_per_step)
        warmup = self.method.warmup_steps(self.total_steps)  # a warm-up longer than the run fails here, before any work
        # --comm onebit / powersgd send full gradients until this step (default: the LR warm-up)
        self.compress_from = cfg.freeze_step or max(1, warmup)
        self._check_method_fits()

    def _check_per_parameter_step(self) -> None:
        """bf16 storage and the step inside backward step each parameter through the optimizer's
        ``step_param``: an ``optimizer_factory``'s optimizer has none."""
        needs = [flag for flag, on in (("--param-dtype bf16", self.param_dtype != torch.float32),
                                       ("--layerwise-step", self.layerwise_step)) if on]
        if needs and self.cfg.optimizer_factory is not None:
            raise UsageError(f"{' and '.join(needs)} step each parameter through lowrank's optimizers (ProjectedAdamW, Muon); "
                             f"an optimizer_factory's optimizer has no per-parameter step: drop {' and '.join(needs)} with it")

    def _check_storage(self) -> None:
        """bf16 storage steps each parameter in fp32: refuse, in one line, what cannot do that yet."""
        if self.param_dtype == torch.float32:
            return
        cfg = self.cfg
        if cfg.comm == "onebit":
            raise UsageError("--param-dtype bf16 with --comm onebit: 1-bit Adam updates all parameters at once from "
                             "compressed momenta; use --param-dtype fp32 with it, or another --comm")

    def _check_layerwise(self) -> None:
        """What cannot step inside backward, refused in one line with what to do instead."""
        if not self.layerwise_step:
            return
        cfg = self.cfg
        if cfg.comm in ("onebit", "projected"):
            raise UsageError(f"--layerwise-step with --comm {cfg.comm}: that communication steps the optimizer itself once "
                             "the whole gradient is reduced; use --comm none, bf16, fp16 or powersgd with --layerwise-step")
        if cfg.compile:
            raise UsageError("--layerwise-step with --compile: the per-parameter hooks would break the compiled backward "
                             "into pieces; use one of them")

    def _build_data(self):
        """Tokenizer, loaders and validation chunks; the model config takes the tokenizer's ids."""
        cfg = self.cfg
        data = build_data(
            cfg.data, seq_len=cfg.seq_len, batch_size=cfg.batch_size, seed=cfg.seed, tokenizer=cfg.tokenizer,
            vocab_size=cfg.vocab_size or self.model_config.vocab_size, cache_dir=cfg.cache_dir or self.folder.path,
            rank=self.dist.rank, world_size=self.dist.world_size, max_valid_tokens=cfg.eval_tokens, text_field=cfg.text_field,
        )
        tokenizer = data.tokenizer
        eos = tokenizer.eos_token_id
        for key, value in {"vocab_size": len(tokenizer), "eos_token_id": eos, "pad_token_id": tokenizer.pad_token_id,
                           "bos_token_id": tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos}.items():
            setattr(self.model_config, key, value)
        return data

    def _check_method_fits(self) -> None:
        """The method on this model, built on the ``meta`` device (nothing allocated): a rank that
        does not fit a layer fails here, before the data is tokenized or anything is written."""
        model = build_model(self.model_config, device="meta")
        apply_method(model, self.method, seed=self.cfg.seed, lowrank=True)
        if self.activation_checkpointing:
            check_activation_checkpointing(model)
        if self.cfg.optimizer_factory is None:
            build_optimizer(model, self.method, seed=self.cfg.seed)

    # ------------------------------------------------------------------ phases

    def phase_at(self, step: int) -> Phase:
        """The phase that runs step ``step + 1`` (the last phase once the run is done)."""
        return next((p for p in self.phases if p.start <= step < p.end), self.phases[-1])

    def _enter(self, phase: Phase, *, carry_state: bool = True) -> None:
        """Make the model, optimizer and controller of ``phase``, starting at ``self.step``."""
        self.phase = phase
        apply_method(self.model, self.method, seed=self.cfg.seed, lowrank=not phase.dense)
        # On the bare model, before DDP / FSDP2 / compile wrap it (the checkpointing flag lives on the
        # decoder layers, which every phase keeps): bf16 storage of what the method just added too.
        prepare_model(self.model, storage=self.param_dtype, compute=self.compute_dtype,
                      activation_checkpointing=self.activation_checkpointing)
        previous = self.optimizer.state if (carry_state and self.optimizer is not None) else {}
        # Drop the old DDP wrapper first: its reducer's gradient hooks go with it.
        self.module = None
        gc.collect()
        # FSDP2 replaces the parameters by shards: the optimizer is built over those.
        self.module = self.strategy.prepare(self.model)
        self.optimizer = self._build_optimizer()
        if self.layerwise is not None:
            self.layerwise.close()
        self.layerwise = self._build_layerwise()
        for group in self.optimizer.param_groups:  # parameters that live on (embeddings, norms, head)
            for p in group["params"]:
                if p in previous:
                    self.optimizer.state[p] = previous[p]
        self.controller = build_controller(self.model, self.optimizer, self.method, total_steps=self.total_steps,
                                           start_step=self.step, layer_events=not phase.dense)
        self.strategy.attach(self.module, self.optimizer, self.step, compress_from=self.compress_from,
                             layerwise=self.layerwise)
        if self.cfg.compile:
            self.module = torch.compile(self.module)

    def release_wrapper(self) -> None:
        """Drop the DDP wrapper while the process group still exists.

        DDP's C++ reducer holds a reference to the process group and is freed without releasing
        the GIL. Freed after ``destroy_process_group`` (when ``pretrain`` returns), it holds the
        group's last reference: gloo's destructor then joins its worker threads while one of them
        waits for the GIL to free a finished all-gather's tensors — a deadlock at the end of an
        otherwise finished run (seen on rank 1 of 2-rank CPU runs, now and then). The wrapper sits
        in reference cycles: :func:`lowrank.distributed.end_process_group`, called right after,
        collects them before it destroys the group.
        """
        self.module = None

    def _build_optimizer(self) -> torch.optim.Optimizer:
        """The preset's optimizer (or the caller's factory; or 1-bit Adam over the preset's groups
        with ``--comm onebit``)."""
        if self.cfg.optimizer_factory is not None:
            return self.cfg.optimizer_factory(self.model, self.method)
        if self.cfg.comm == "onebit":
            from ..distributed.onebit import OneBitAdam

            settings = self.method.optimizer
            try:
                return OneBitAdam(param_groups(self.model, self.method), lr=settings.lr, betas=settings.betas, eps=settings.eps,
                                  weight_decay=settings.weight_decay, freeze_step=self.compress_from)
            except ValueError as error:
                raise UsageError(f"--comm onebit: {error}") from None
        return build_optimizer(self.model, self.method, seed=self.cfg.seed)

    def _build_layerwise(self) -> LayerwiseStep | None:
        """The optimizer step inside backward (``--layerwise-step``), carrying the clip's norm over
        from the previous phase's."""
        if not self.layerwise_step:
            return None
        layerwise = LayerwiseStep(self.optimizer, storage=self.param_dtype, rounding=self.method.training.bf16_rounding,
                                  seed=self.cfg.seed, grad_clip=self.method.training.grad_clip,
                                  sum_over_ranks=self.strategy.sum_over_ranks())
        if self.layerwise is not None:
            layerwise.load_state_dict(self.layerwise.state_dict())
        return layerwise

    def _check_resumable(self) -> None:
        """A checkpoint at the end of the run, or one trained with other shapes, is refused with
        what differs (not reported as a corrupt file)."""
        checkpoint, step = self.resume.checkpoint, self.resume.step
        if step >= self.total_steps:
            raise UsageError(f"checkpoint {checkpoint} is at step {step}, the end of this run ({self.total_steps} steps): nothing "
                             "to resume; raise --max-steps / --max-tokens to train further, or export it with lowrank export")
        meta = self.resume.meta()
        self.strategy.check_resumable(checkpoint)
        changes = structural_differences(meta.method, self.method.to_dict(), meta.model_config, self.model_config.to_dict())
        if changes:
            raise UsageError(f"checkpoint {checkpoint} was trained with other shapes ({'; '.join(changes)}); resume with the "
                             "settings it was started with, or start afresh with --overwrite")

    def _restore(self) -> None:
        """Weights, optimizer state, clock, data position and RNG from the checkpoint; the
        hyper-parameters (lr, betas, weight decay, ...) are this run's, so overrides given on
        resume (``--lr``, ``--set optimizer.weight_decay=...``) apply from here on."""
        state = self.resume.state
        settings = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
        self.strategy.load(self.resume.checkpoint, state, model=self.model, optimizer=self.optimizer)
        for group, own in zip(self.optimizer.param_groups, settings):
            group.update(own)
        self.controller.load_state_dict(state["controller"])
        self.strategy.load_comm_state(state.get("comm"))
        if self.layerwise is not None:  # a run started without --layerwise-step: its first step is not clipped
            self.layerwise.load_state_dict(state.get("layerwise", {}))
        data_states = state["data"]
        # A packed corpus is read in the same global order at any world size (the loader maps the
        # position); a stream's position is per rank and needs the same number of ranks.
        self.data.train.load_state_dict(data_states[self.dist.rank] if len(data_states) == self.dist.world_size
                                        else data_states[0])
        torch.set_rng_state(state["rng"]["cpu"])
        if self.device.type == "cuda" and "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)

    # ------------------------------------------------------------------ one step, evaluation, checkpoint

    def _train_step(self) -> tuple[float, float, float]:
        """``grad_accum`` micro-batches, clip, optimizer step, controller step: (loss, grad norm, lr)."""
        cfg = self.cfg
        # Summed on the device: one host sync per step, not one per micro-batch.
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(cfg.grad_accum):
            batch = next(self.data.train).to(self.device, non_blocking=True)
            if micro == 0:
                # "has its data for step N": before the first collective of the step (DDP's
                # buffer broadcast in forward), so a rank that stalls is the one behind
                self.heartbeat.beat(self.step + 1)
            last = micro == cfg.grad_accum - 1
            if last and self.layerwise is not None:
                self.layerwise.arm(self.step)
            with self.strategy.sync_context(self.module, last), self.autocast:
                # no KV cache in training (transformers would turn it off under checkpointing, with a warning)
                loss = self.module(input_ids=batch, labels=batch, use_cache=False).loss
            (loss / cfg.grad_accum).backward()
            loss_sum += loss.detach().float() / cfg.grad_accum
        lr = self.optimizer.param_groups[0]["lr"]
        if self.layerwise is not None:
            # Every parameter has stepped in backward (a non-finite one was left alone and makes the norm NaN).
            grad_norm = self.layerwise.finish()
        else:
            grad_clip = self.method.training.grad_clip
            trainable = [p for p in self.model.parameters() if p.requires_grad]
            grad_norm = self.strategy.grad_norm(torch.nn.utils.clip_grad_norm_(trainable, grad_clip if grad_clip else float("inf")))
        # The norm is the same on every rank (after DDP's all-reduce): they all skip, or none.
        self.skipped = self.health.should_skip(grad_norm)
        if self.layerwise is None and not self.skipped:
            optimizer_step(self.optimizer, storage=self.param_dtype, rounding=self.method.training.bf16_rounding,
                           seed=self.cfg.seed, step=self.step)
        self.optimizer.zero_grad(set_to_none=True)
        self.event = self.controller.step()
        self.step += 1
        if self.dist.enabled:
            dist.all_reduce(loss_sum)
            loss_sum /= self.dist.world_size
        return loss_sum.item(), grad_norm, lr

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean token loss on the fixed validation chunks (sharded over ranks, then summed)."""
        self.module.eval()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        count = torch.zeros((), dtype=torch.float64, device=self.device)
        # every chunk once over the ranks; a batch not counted only keeps FSDP2's collectives in step
        for batch, counted in self.strategy.validation_batches(self.data.valid, self.cfg.batch_size):
            batch = batch.to(self.device)
            with self.autocast:
                loss = self.model(input_ids=batch, labels=batch).loss
            tokens = batch.shape[0] * (batch.shape[1] - 1) if counted else 0
            loss_sum += loss.double() * tokens
            count += tokens
        if self.dist.enabled:
            dist.all_reduce(loss_sum)
            dist.all_reduce(count)
        self.module.train()
        return float(loss_sum / count.clamp_min(1))

    def _diverged(self, reason: str, seen: int) -> UsageError:
        """The stop message once step ``seen`` went wrong: what happened, the newest checkpoint from
        before the state that went wrong (:meth:`StepHealth.last_trusted_step`), and what to change."""
        trusted = self.health.last_trusted_step(seen)
        if self.dist.main:
            good = self.folder.drop_checkpoints_after(trusted)
        else:
            good = [c for c in list_checkpoints(self.folder.checkpoints) if checkpoint_step(c) <= trusted]
        why, flags = self._remedy()
        if good:
            hint = f"the last good checkpoint is {good[-1]}; resume from it with {why}, e.g. --resume {good[-1]} {flags}"
        else:
            hint = f"no checkpoint was written before step {max(trusted, 0) + 1}; start again with {why} ({flags})"
        return UsageError(f"{reason} (step {seen}): training stopped and nothing of this state was saved; {hint}")

    def _remedy(self) -> tuple[str, str]:
        """What would prevent the blow-up, in words and as flags: an eps of 0 first (Adam divides by
        sqrt(v) + eps, and v is 0 wherever a gradient entry is), else an lr back in the preset's range
        (halving 1e6 does not help), else half the lr."""
        preset = load_method(self.cfg.method).optimizer
        settings = self.method.optimizer
        if settings.eps == 0:
            eps = preset.eps or 1e-8
            return "an eps above 0 (Adam divides by sqrt(v) + eps)", f"--set optimizer.eps={eps:g}"
        if settings.lr > preset.lr:
            return (f"a learning rate in the preset's range ({preset.lr / 10:g} to {preset.lr:g}; lr {settings.lr:g} diverged)",
                    f"--lr {preset.lr:g}")
        return "a lower learning rate or a longer warm-up", f"--lr {settings.lr / 2:g}"

    def _checkpoint(self) -> None:
        # Only a finite state becomes a checkpoint: one foreach norm over weights and moments.
        named = list(self.model.named_parameters())
        named += [(f"optimizer state {key}", value) for state in self.optimizer.state.values() for key, value in state.items()]
        bad = first_nonfinite(self.strategy.local_tensors(named))
        if self.strategy.any_rank(bad is not None):
            raise self._diverged(f"{bad or 'a tensor on another rank'} became non-finite", self.step)
        # A streamed corpus has a different position on every rank: keep all of them.
        data_states = [self.data.train.state_dict()]
        if self.dist.enabled:
            own, data_states = data_states[0], [None] * self.dist.world_size
            dist.all_gather_object(data_states, own)
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        state = {"step": self.step, "world_size": self.dist.world_size, "controller": self.controller.state_dict(),
                 "data": data_states, "rng": rng, "comm": self.strategy.comm_state()}
        if self.layerwise is not None:
            state["layerwise"] = self.layerwise.state_dict()
        config = {k: v for k, v in asdict(self.cfg).items() if k != "optimizer_factory"}
        meta = CheckpointMeta(config=config, method=self.method.to_dict(), model_config=self.model_config.to_dict(),
                              wrapped=is_wrapped(self.model), step=self.step)
        self.strategy.save(self.folder.checkpoints, self.step, model=self.model, optimizer=self.optimizer, trainer_state=state,
                           meta=meta.to_dict(), keep=self.cfg.keep_checkpoints)

    # ------------------------------------------------------------------ the loop

    def train(self) -> dict[str, Any]:
        cfg, is_main = self.cfg, self.dist.main
        if is_main and self.resume is None:
            self.folder.clear_checkpoints()  # --overwrite, now that every check has passed
        if is_main:
            self.folder.remove_stale_files()
        logger = MetricsLogger(self.folder.metrics, self.step, self.folder.tensorboard) if is_main else None
        if is_main:
            self.folder.save_tokenizer(self.data.tokenizer)
            self.folder.write_config({"config": asdict(cfg), "method": self.method.to_dict(), "data": self.data.description})
        accounting.reset_peak_memory(self.device)
        self.module.train()
        step_times: list[float] = []
        recent_losses: collections.deque[float] = collections.deque(maxlen=10)  # the final train loss averages these
        if logger is not None:  # a resumed run averages over the steps before the resume too
            recent_losses.extend(r["loss"] for r in logger.history if "loss" in r)
        val_loss = None
        self.allocator_peak = None
        profiled_step = self.step + 2  # this process's second step: the optimizer's state exists
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not (is_main and cfg.progress), dynamic_ncols=True,
                   desc=self.method.name, unit="step")
        while self.step < self.total_steps:
            started = time.perf_counter()
            try:
                if self.step + 1 == profiled_step:
                    loss, grad_norm, lr = self._allocator_profiled(self._train_step)
                else:
                    loss, grad_norm, lr = self._train_step()
            except StopTraining as stop:
                raise self._diverged(str(stop), self.step + 1) from None
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            elapsed = time.perf_counter() - started
            step_times.append(elapsed)
            recent_losses.append(loss)
            tokens = self.step * self.tokens_per_step
            if is_main:
                memory = accounting.peak_memory_bytes(self.device)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{self.tokens_per_step / elapsed:,.0f}", mem=f"{memory / 2**30:.2f}G")
                if self.step % cfg.log_every == 0 or self.step == self.total_steps or self.skipped:
                    logger.log({"step": self.step, "tokens": tokens, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                                "tokens_per_s": self.tokens_per_step / elapsed, "peak_memory_bytes": memory,
                                **({"allocator_peak_bytes": self.allocator_peak} if self.step == profiled_step else {}),
                                **self.strategy.comm_record(), **({"skipped": True} if self.skipped else {})})
                if self.event is not None:
                    event = self.event
                    logger.log({"step": self.step, "tokens": tokens, "event": event.event, "layers": event.layers,
                                "reset_params": event.reset_params, "rotated_params": event.rotated_params,
                                "mean_top_singular_value": event.mean_top_singular_value})
            if self.step == self.phase.end and self.phase is not self.phases[-1]:
                self._enter(self.phase_at(self.step))
            if (cfg.eval_every and self.step % cfg.eval_every == 0) or self.step == self.total_steps:
                val_loss = self.evaluate()
                if is_main:
                    logger.log({"step": self.step, "tokens": tokens, "val_loss": val_loss, "val_ppl": math.exp(val_loss)})
                    bar.write(f"step {self.step}: val loss {val_loss:.4f}, ppl {math.exp(val_loss):.2f}")
            if self.step == self.total_steps:
                try:
                    self.health.check_alive_at_end()
                except StopTraining as stop:
                    raise self._diverged(str(stop), self.step) from None
                self._checkpoint()
            elif cfg.save_every and self.step % cfg.save_every == 0 and not self.health.bad_in_a_row:
                # not while the gradient is zero or non-finite: that state may be the dead one, and
                # pruning (--keep-checkpoints) would drop the good checkpoints from before it
                self._checkpoint()
        bar.close()
        summary = self._summary(step_times, recent_losses, val_loss)
        if is_main:
            self.folder.write_summary(summary)
            if cfg.json_out:
                Path(cfg.json_out).parent.mkdir(parents=True, exist_ok=True)
                Path(cfg.json_out).write_text(self.folder.summary.read_text())
            logger.close()
            if cfg.plot:
                from ..plots import plot_loss_curves

                plot_loss_curves(self.folder.metrics, self.folder.loss_plot, title=f"{self.method.name} · {summary['model']}")
        return summary

    def _allocator_profiled(self, train_step):
        """``train_step()`` with the allocator's peak recorded (:attr:`allocator_peak`): CUDA's
        ``max_memory_allocated``; on a CPU the bytes live before the step plus the
        torch profiler's largest rise of allocations during it (as ``lowrank memory --measure``).
        One step, not every step: the profiler slows the step it watches."""
        if self.device.type == "cuda":  # since the start of the run (the first step's peak is no higher)
            result = train_step()
            self.allocator_peak = int(torch.cuda.max_memory_allocated(self.device))
            return result
        gc.collect()  # no collection of earlier garbage inside the profiled step
        before = accounting.live_bytes(self.model, self.optimizer)
        result, rises = accounting.profiled_allocation_rises(train_step)
        self.allocator_peak = None if rises is None else before + max(rises)
        return result

    def _summary(self, step_times: list[float], recent_losses, val_loss: float | None) -> dict[str, Any]:
        own_hash = parameter_hash(self.model)
        hashes = [own_hash]
        if self.dist.enabled:
            hashes = [None] * self.dist.world_size
            dist.all_gather_object(hashes, own_hash)
            if len(set(hashes)) != 1 and self.dist.main:
                print(f"warning: parameters differ across ranks at the end of the run: {hashes}", file=sys.stderr)
        counts = count_parameters(self.model)
        state_bytes = accounting.optimizer_state_bytes(self.optimizer)
        # Median step time after the first few steps (start-up, allocator and thread warm-up).
        warm = step_times[min(len(step_times) - 1, 3):] if step_times else [float("nan")]
        return {
            "method": self.method.name,
            "model": Path(self.cfg.model).stem,
            "steps": self.step,
            "tokens": self.step * self.tokens_per_step,
            "final_train_loss": statistics.fmean(recent_losses) if recent_losses else None,
            "val_loss": val_loss,
            "val_ppl": math.exp(val_loss) if val_loss is not None else None,
            "tokens_per_s": self.tokens_per_step / statistics.median(warm),
            "skipped_steps": self.health.skipped_total,
            "trainable_params": counts.trainable,
            "frozen_params": counts.frozen,
            "optimizer_state_bytes": state_bytes,
            "model_state_bytes": accounting.parameter_bytes(self.model) + accounting.gradient_bytes(self.model) + state_bytes,
            "peak_memory_bytes": accounting.peak_memory_bytes(self.device),
            "peak_memory_kind": "cuda_max_allocated" if self.device.type == "cuda" else "process_peak_rss",
            # the allocator's peak over one step (this process's second), as lowrank memory --measure reports it
            "allocator_peak_bytes": self.allocator_peak,
            "device": str(self.device) if self.device.type != "cuda" else torch.cuda.get_device_name(self.device),
            "world_size": self.dist.world_size,
            "strategy": self.strategy.name,
            "comm": self.cfg.comm,
            "comm_bytes_total": self.strategy.comm_record().get("comm_bytes_total"),
            "parameter_hashes": hashes,
            "precision": self.precision,
            "param_dtype": dtype_name(self.param_dtype),
            "activation_checkpointing": self.activation_checkpointing,
            "layerwise_step": self.layerwise_step,
            "run_dir": str(self.folder.path),
        }


def pretrain(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) a pretraining run and return its summary."""
    ok = False
    trainer = None
    try:
        trainer = Trainer(cfg)
        try:
            summary = trainer.train()
        except RuntimeError as error:
            if trainer.dist.enabled and is_comm_failure(error):
                raise UsageError(stalled_message(trainer.heartbeat, cfg.dist_timeout, error)) from None
            raise
        ok = True
        return summary
    finally:
        if trainer is not None:
            trainer.release_wrapper()
        end_process_group(completed=ok)
