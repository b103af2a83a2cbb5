"""``lowrank pretrain``: pretrain a causal LM with any method preset, on one process or under
``torchrun`` (DDP: gloo on CPU, NCCL on GPU).

The loop, in the spirit of nanoGPT's ``train.py``: build data → model → method (wrap, optimizer,
restart controller) → optionally resume → for each step: ``grad_accum`` micro-batches, clip,
``optimizer.step()``, ``controller.step()`` (restarts + LR), log, evaluate, checkpoint. Every
source of randomness after start-up is a function of the seed and the step, and checkpoints hold
the data position, so a resumed run reproduces the uninterrupted one bit for bit.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import gc
import hashlib
import json
import math
import os
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from . import accounting
from .checkpoint import list_checkpoints, load_checkpoint, read_trainer_state, resolve_checkpoint, save_checkpoint
from .data import build_data
from .errors import UsageError
from .methods import Method, apply_method, available_methods, build_controller, build_optimizer, load_method, method_overrides
from .models import build_model, load_model_config
from .wrap import _unwrap_parallel, count_parameters, is_wrapped

__all__ = ["TrainConfig", "pretrain", "add_arguments", "run_from_args"]


@dataclass
class TrainConfig:
    """Everything a run needs; the command-line flags map one to one onto these fields."""

    method: str = "low_rank_restarts"
    model: str = "llama_60m"
    data: str = "builtin"
    tokenizer: str | None = None
    vocab_size: int | None = None
    rank: int | None = None
    lr: float | None = None
    cycle_length: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    seq_len: int = 256
    max_steps: int | None = None
    max_tokens: int | None = None
    eval_every: int = 100
    eval_tokens: int = 262_144
    save_every: int = 0
    keep_checkpoints: int = 2
    log_every: int = 1
    out: str | None = None
    resume: str | None = None
    overwrite: bool = False
    seed: int = 0
    json_out: str | None = None
    precision: str = "auto"
    device: str = "auto"
    compile: bool = False
    progress: bool = True
    plot: bool = True
    cache_dir: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    # Python API only: build the optimizer yourself (e.g. a peer library's) from the model and the
    # parsed preset; the preset's schedule, restarts and everything else still apply.
    optimizer_factory: Callable[[nn.Module, Method], torch.optim.Optimizer] | None = field(default=None, repr=False)

    def run_dir(self) -> Path:
        return Path(self.out) if self.out else Path("runs") / f"{Path(self.method).stem}-{Path(self.model).stem}"


# ---------------------------------------------------------------------- set-up helpers


@dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _init_distributed(device_choice: str) -> tuple[_Dist, torch.device]:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    info = _Dist(int(os.environ.get("RANK", "0")), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    want_cuda = device_choice == "cuda" or (device_choice == "auto" and torch.cuda.is_available())
    if device_choice == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is visible; use --device cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if want_cuda else "gloo")
    if want_cuda:
        torch.cuda.set_device(info.local_rank)
        device = torch.device("cuda", info.local_rank)
    else:
        device = torch.device("cpu")
        # Several ranks on one CPU each spinning all cores' OpenMP threads is catastrophically
        # slow (observed 100x on LAPACK calls); give each rank its share of the cores.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        if local_world > 1:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return info, device


def _autocast(device: torch.device, precision: str):
    if precision == "auto":
        precision = "bf16-mixed" if device.type == "cuda" else "fp32"
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16), precision
    if precision == "fp32":
        return contextlib.nullcontext(), precision
    raise UsageError(f"--precision must be auto, fp32 or bf16-mixed, got {precision!r}")


def _total_steps(cfg: TrainConfig, tokens_per_step: int) -> int:
    steps = cfg.max_steps if cfg.max_steps is not None else math.ceil(cfg.max_tokens / tokens_per_step)
    if steps <= 0:
        raise UsageError(f"the run has {steps} steps; raise --max-steps / --max-tokens")
    return steps


def _validate(cfg: TrainConfig) -> None:
    """Checks that need nothing but the config, so a bad run stops before any data or model work."""
    if cfg.max_steps is None and cfg.max_tokens is None:
        raise UsageError("give --max-steps N or --max-tokens N (the run's budget)")
    if cfg.max_steps is not None and cfg.max_tokens is not None:
        raise UsageError("give exactly one of --max-steps and --max-tokens")
    for name in ("batch_size", "grad_accum", "seq_len", "eval_tokens", "keep_checkpoints", "log_every"):
        if getattr(cfg, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    for name in ("eval_every", "save_every"):
        if getattr(cfg, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0 (0 = only at the end), got {getattr(cfg, name)}")


# ---------------------------------------------------------------------- the run


class _Run:
    """State of one training run (model, optimizer, controller, data, logs)."""

    def __init__(self, cfg: TrainConfig) -> None:
        _validate(cfg)
        self.cfg = cfg
        self.dist, self.device = _init_distributed(cfg.device)
        self.autocast, self.precision = _autocast(self.device, cfg.precision)
        self.run_dir = cfg.run_dir()
        # Resolve and read --resume before anything is written, so a bad path changes nothing.
        self.resume_from = resolve_checkpoint(cfg.resume, self.run_dir) if cfg.resume else None
        self.trainer_state: dict[str, Any] = read_trainer_state(self.resume_from) if self.resume_from else {}
        if self.resume_from is not None and int(self.trainer_state.get("world_size", 1)) != self.dist.world_size:
            raise UsageError(
                f"checkpoint {self.resume_from} was written by {self.trainer_state.get('world_size')} processes; resume with "
                "the same number (the data order is sharded per process)"
            )
        if cfg.resume and cfg.overwrite:
            raise UsageError("--resume continues a run and --overwrite starts it afresh: give one of them")
        if self.resume_from is None and list_checkpoints(self.run_dir / "checkpoints"):
            if not cfg.overwrite:
                raise UsageError(
                    f"{self.run_dir} already holds checkpoints of an earlier run; continue it with --resume latest, "
                    "start afresh with --overwrite, or pick another --out"
                )
            if self.dist.main:
                shutil.rmtree(self.run_dir / "checkpoints")
        overrides = {**cfg.overrides, **method_overrides(cfg.method, rank=cfg.rank, lr=cfg.lr, cycle_length=cfg.cycle_length)}
        self.method = load_method(cfg.method, overrides)

        model_config = load_model_config(cfg.model)
        if cfg.seq_len > getattr(model_config, "max_position_embeddings", cfg.seq_len):
            raise UsageError(f"--seq-len {cfg.seq_len} exceeds the model's max_position_embeddings ({model_config.max_position_embeddings})")
        self.data = build_data(
            cfg.data,
            seq_len=cfg.seq_len,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            tokenizer=cfg.tokenizer,
            vocab_size=cfg.vocab_size or model_config.vocab_size,
            cache_dir=cfg.cache_dir or self.run_dir,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            max_valid_tokens=cfg.eval_tokens,
        )
        tokenizer = self.data.tokenizer
        for key, value in {"vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id,
                           "bos_token_id": tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id,
                           "pad_token_id": tokenizer.pad_token_id}.items():
            setattr(model_config, key, value)
        self.model_config = model_config

        self.tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * self.dist.world_size
        self.total_steps = _total_steps(cfg, self.tokens_per_step)
        self.step = 0
        self.model = build_model(model_config, seed=cfg.seed).to(self.device)
        self.dense_phase = self.method.warm_start_steps > int(self.trainer_state.get("step", 0))
        if not self.dense_phase:
            apply_method(self.model, self.method, seed=cfg.seed)
        self._build_optimizer()
        if self.resume_from is not None:
            self._resume()
        self.module = self._wrap_ddp()

    # ------------------------------------------------------------------ building blocks

    def _build_optimizer(self, num_steps: int = 0) -> None:
        if self.cfg.optimizer_factory is not None:
            self.optimizer = self.cfg.optimizer_factory(self.model, self.method)
        else:
            self.optimizer = build_optimizer(self.model, self.method, seed=self.cfg.seed)
        self.controller = build_controller(self.model, self.optimizer, self.method, total_steps=self.total_steps,
                                           layer_events=not self.dense_phase)
        if num_steps:
            self.controller.load_state_dict({"num_steps": num_steps})

    def _wrap_ddp(self) -> nn.Module:
        module: nn.Module = self.model
        if self.dist.enabled:
            module = nn.parallel.DistributedDataParallel(module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if self.cfg.compile:
            module = torch.compile(module)
        return module

    def _resume(self) -> None:
        state = self.trainer_state
        load_checkpoint(self.resume_from, self.model, self.optimizer, device=self.device)
        self.step = int(state["step"])
        self.controller.load_state_dict(state["controller"])
        self.data.train.load_state_dict(state["data"][self.dist.rank])
        torch.set_rng_state(state["rng"]["cpu"])
        if self.device.type == "cuda" and "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)

    def _end_warm_start(self) -> None:
        """ReLoRA's warm start is over: factorize the trained dense model (W0 = trained weight,
        B = 0, so the function is unchanged) and carry the other parameters' optimizer state."""
        old_state = self.optimizer.state
        apply_method(self.model, self.method, seed=self.cfg.seed)
        self.dense_phase = False
        self._build_optimizer(num_steps=self.step)
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p in old_state:
                    self.optimizer.state[p] = old_state[p]
        # Drop the old DDP wrapper first: its reducer's gradient hooks go with it.
        self.module = None
        gc.collect()
        self.module = self._wrap_ddp()

    def _checkpoint(self) -> Path | None:
        # A streamed corpus has a different position on every rank: keep all of them.
        own_data_state = self.data.train.state_dict()
        data_states = [own_data_state]
        if self.dist.enabled:
            data_states = [None] * self.dist.world_size
            dist.all_gather_object(data_states, own_data_state)
        state = {
            "step": self.step,
            "world_size": self.dist.world_size,
            "controller": self.controller.state_dict(),
            "data": data_states,
            "rng": {"cpu": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state(self.device)} if self.device.type == "cuda" else {})},
        }
        if not self.dist.main:
            return None
        meta = {"config": asdict(self.cfg), "method": self.method.to_dict(), "model_config": self.model_config.to_dict(),
                "wrapped": is_wrapped(self.model)}
        path = save_checkpoint(self.run_dir / "checkpoints", self.step, model=self.model, optimizer=self.optimizer,
                               trainer_state=state, meta=meta, keep=self.cfg.keep_checkpoints)
        return path

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean token loss on the fixed validation chunks (sharded over ranks, then summed)."""
        self.module.eval()
        valid = self.data.valid
        shard = valid[self.dist.rank :: self.dist.world_size]
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        count = torch.zeros((), dtype=torch.float64, device=self.device)
        for start in range(0, shard.shape[0], self.cfg.batch_size):
            batch = shard[start : start + self.cfg.batch_size].to(self.device)
            with self.autocast:
                loss = self.model(input_ids=batch, labels=batch).loss
            tokens = batch.shape[0] * (batch.shape[1] - 1)
            loss_sum += loss.double() * tokens
            count += tokens
        if self.dist.enabled:
            dist.all_reduce(loss_sum)
            dist.all_reduce(count)
        self.module.train()
        return float(loss_sum / count.clamp_min(1))

    # ------------------------------------------------------------------ training

    def train(self) -> dict[str, Any]:
        cfg, is_main = self.cfg, self.dist.main
        logger = _MetricsLogger(self.run_dir, resume_step=self.step) if is_main else None
        if is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            # The run folder is self-contained: `lowrank export` finds the tokenizer here even when
            # it came from the hub or another path.
            if not (self.run_dir / "tokenizer" / "tokenizer_config.json").is_file():
                self.data.tokenizer.save_pretrained(self.run_dir / "tokenizer")
            (self.run_dir / "config.json").write_text(json.dumps(
                {"config": asdict(cfg), "method": self.method.to_dict(), "data": self.data.description}, indent=2, default=str) + "\n")
        counts = count_parameters(self.model)
        accounting.reset_peak_memory(self.device)
        self.module.train()
        step_times: list[float] = []
        recent_losses: collections.deque[float] = collections.deque(maxlen=10)  # the final train loss averages these
        val_loss = None
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not (is_main and cfg.progress), dynamic_ncols=True,
                   desc=f"{self.method.name}", unit="step")
        while self.step < self.total_steps:
            if self.dense_phase and self.step >= self.method.warm_start_steps:
                self._end_warm_start()
            started = time.perf_counter()
            # Summed on the device: one host sync per step, not one per micro-batch.
            loss_sum = torch.zeros((), device=self.device)
            for micro in range(cfg.grad_accum):
                batch = next(self.data.train).to(self.device, non_blocking=True)
                sync = micro == cfg.grad_accum - 1 or not self.dist.enabled
                with (contextlib.nullcontext() if sync else self.module.no_sync()), self.autocast:
                    loss = self.module(input_ids=batch, labels=batch).loss
                (loss / cfg.grad_accum).backward()
                loss_sum += loss.detach().float() / cfg.grad_accum
            grad_clip = self.method.training.get("grad_clip")
            trainable = [p for p in self.model.parameters() if p.requires_grad]
            grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, grad_clip if grad_clip else float("inf")))
            lr = self.optimizer.param_groups[0]["lr"]
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            event = self.controller.step()
            self.step += 1
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            elapsed = time.perf_counter() - started
            step_times.append(elapsed)
            if self.dist.enabled:
                dist.all_reduce(loss_sum)
                loss_sum /= self.dist.world_size
            loss_total = loss_sum.item()
            recent_losses.append(loss_total)
            tokens_seen = self.step * self.tokens_per_step
            if is_main:
                memory = accounting.peak_memory_bytes(self.device)
                bar.update(1)
                bar.set_postfix(loss=f"{loss_total:.3f}", tok_s=f"{self.tokens_per_step / elapsed:,.0f}", mem=f"{memory / 2**30:.2f}G")
                if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                    logger.log({"step": self.step, "tokens": tokens_seen, "loss": loss_total, "lr": lr, "grad_norm": grad_norm,
                                "tokens_per_s": self.tokens_per_step / elapsed, "peak_memory_bytes": memory})
                if event is not None:
                    logger.log({"step": self.step, "tokens": tokens_seen, "event": event.event, "layers": event.layers,
                                "reset_params": event.reset_params, "mean_top_singular_value": event.mean_top_singular_value})
            if not math.isfinite(loss_total):
                raise UsageError(f"the loss became {loss_total} at step {self.step}: training diverged; lower --lr or raise the warm-up")
            if (cfg.eval_every and self.step % cfg.eval_every == 0) or self.step == self.total_steps:
                val_loss = self.evaluate()
                if is_main:
                    logger.log({"step": self.step, "tokens": tokens_seen, "val_loss": val_loss, "val_ppl": math.exp(val_loss)})
                    bar.write(f"step {self.step}: val loss {val_loss:.4f}, ppl {math.exp(val_loss):.2f}")
            if (cfg.save_every and self.step % cfg.save_every == 0) or self.step == self.total_steps:
                self._checkpoint()
        bar.close()

        own_hash = parameter_hash(self.model)
        hashes = [own_hash]
        if self.dist.enabled:
            hashes = [None] * self.dist.world_size
            dist.all_gather_object(hashes, own_hash)
            if len(set(hashes)) != 1 and is_main:
                print(f"warning: parameters differ across ranks at the end of the run: {hashes}", file=sys.stderr)
        state_bytes = accounting.optimizer_state_bytes(self.optimizer)
        # Median step time after the first few steps (start-up, allocator and thread warm-up).
        warm = step_times[min(len(step_times) - 1, 3):] if step_times else [float("nan")]
        summary = {
            "method": self.method.name,
            "model": Path(self.cfg.model).stem,
            "steps": self.step,
            "tokens": self.step * self.tokens_per_step,
            "final_train_loss": statistics.fmean(recent_losses) if recent_losses else None,
            "val_loss": val_loss,
            "val_ppl": math.exp(val_loss) if val_loss is not None else None,
            "tokens_per_s": self.tokens_per_step / statistics.median(warm),
            "trainable_params": counts.trainable,
            "frozen_params": counts.frozen,
            "optimizer_state_bytes": state_bytes,
            "model_state_bytes": accounting.parameter_bytes(self.model) + accounting.gradient_bytes(self.model) + state_bytes,
            "peak_memory_bytes": accounting.peak_memory_bytes(self.device),
            "peak_memory_kind": "cuda_max_allocated" if self.device.type == "cuda" else "process_peak_rss",
            "device": str(self.device) if self.device.type != "cuda" else torch.cuda.get_device_name(self.device),
            "world_size": self.dist.world_size,
            "parameter_hashes": hashes,
            "precision": self.precision,
            "run_dir": str(self.run_dir),
        }
        if is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            if cfg.json_out:
                Path(cfg.json_out).parent.mkdir(parents=True, exist_ok=True)
                Path(cfg.json_out).write_text(json.dumps(summary, indent=2) + "\n")
            logger.close()
            if cfg.plot:
                from .plots import plot_loss_curves

                plot_loss_curves(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png", title=f"{self.method.name} · {summary['model']}")
        return summary


def parameter_hash(model: nn.Module) -> str:
    """sha256 of every parameter's bytes, in ``named_parameters`` order: equal hashes mean
    bit-identical weights (how DDP rank consistency is checked at the end of a run)."""
    digest = hashlib.sha256()
    for name, param in _unwrap_parallel(model).named_parameters():
        digest.update(name.encode())
        digest.update(param.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class _MetricsLogger:
    """``metrics.jsonl`` in the run folder, plus TensorBoard when it is installed. On resume,
    lines from beyond the checkpoint's step (written before a crash) are dropped."""

    def __init__(self, run_dir: Path, resume_step: int) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "metrics.jsonl"
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= resume_step] if resume_step else []
            self.path.write_text("".join(line + "\n" for line in kept))
        self.handle = open(self.path, "a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.board = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:
            self.board = None

    def log(self, record: dict[str, Any]) -> None:
        self.handle.write(json.dumps(record) + "\n")
        self.handle.flush()
        if self.board is not None:
            for key, value in record.items():
                if key not in ("step", "event") and isinstance(value, (int, float)):
                    self.board.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self.handle.close()
        if self.board is not None:
            self.board.close()


def pretrain(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) a pretraining run and return its summary."""
    run = _Run(cfg)
    try:
        return run.train()
    finally:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


# ---------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = TrainConfig()
    add = parser.add_argument
    add("--method", default=defaults.method, help=f"preset name ({', '.join(available_methods())}) or a YAML path")
    add("--model", default=defaults.model, help="bundled model (tiny, llama_9m ... llama_7b), a Hugging Face config JSON, or a hub name")
    add("--data", default=defaults.data, help="'builtin' (Python stdlib docstrings), a .txt/.txt.gz/.jsonl/.parquet file or folder, or a hub dataset 'owner/name[:config]'")
    add("--tokenizer", default=None, help="hub name or local path; default: train a byte-level BPE on the training split")
    add("--vocab-size", type=int, default=None, help="vocabulary of the trained BPE (default: the model config's)")
    add("--rank", type=int, default=None, help="override the method's rank (factors and/or gradient projection)")
    add("--lr", type=float, default=None, help="override the method's peak learning rate")
    add("--cycle-length", type=int, default=None, help="override the restart period (steps)")
    add("--batch-size", type=int, default=defaults.batch_size, help="micro-batch size per process")
    add("--grad-accum", type=int, default=defaults.grad_accum, help="micro-batches per optimizer step")
    add("--seq-len", type=int, default=defaults.seq_len)
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--max-steps", type=int, default=None)
    budget.add_argument("--max-tokens", type=int, default=None)
    add("--eval-every", type=int, default=defaults.eval_every, help="steps between validation evaluations (0: only at the end)")
    add("--eval-tokens", type=int, default=defaults.eval_tokens, help="validation tokens (a fixed prefix of the validation split)")
    add("--save-every", type=int, default=defaults.save_every, help="steps between checkpoints (0: only at the end)")
    add("--keep-checkpoints", type=int, default=defaults.keep_checkpoints)
    add("--log-every", type=int, default=defaults.log_every)
    add("--out", default=None, help="run folder (default: runs/<method>-<model>)")
    add("--resume", default=None, help="'latest' (in --out) or a run / checkpoint folder")
    add("--overwrite", action="store_true", help="start afresh in --out, deleting the checkpoints of an earlier run there")
    add("--seed", type=int, default=defaults.seed)
    add("--json-out", default=None, help="also write the final summary as JSON here")
    add("--cache-dir", default=None, help="where the trained tokenizer and token caches live (default: the run folder); share it between runs on one corpus")
    add("--precision", default="auto", choices=["auto", "fp32", "bf16-mixed"], help="auto: bf16 autocast on GPU, fp32 on CPU")
    add("--device", default="auto", choices=["auto", "cpu", "cuda"])
    add("--compile", action="store_true", help="torch.compile the model")
    add("--no-progress", action="store_true", help="no progress bar")
    add("--no-plot", action="store_true", help="skip the loss-curve PNG")
    add("--set", action="append", default=[], metavar="KEY=VALUE",
        help="override any preset key, e.g. --set optimizer.weight_decay=0.1 --set restarts.rewarmup_steps=20")


def _parse_set(items: list[str]) -> dict[str, Any]:
    import yaml

    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--set {item}: expected KEY=VALUE, e.g. --set optimizer.lr=0.001")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def run_from_args(args: argparse.Namespace) -> dict[str, Any]:
    # Every option is named after its TrainConfig field (--batch-size → batch_size); the rest by hand.
    options = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    cfg = TrainConfig(**options, progress=not args.no_progress, plot=not args.no_plot, overrides=_parse_set(args.set))
    summary = pretrain(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(format_summary(summary), file=sys.stdout)
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    def gib(value):
        return f"{value / 2**30:.3f} GiB" if value is not None else "-"

    rows = [
        ("method", summary["method"]),
        ("model", summary["model"]),
        ("steps / tokens", f"{summary['steps']:,} / {summary['tokens']:,}"),
        ("final train loss", f"{summary['final_train_loss']:.4f}" if summary["final_train_loss"] is not None else "-"),
        ("validation perplexity", f"{summary['val_ppl']:.2f}" if summary["val_ppl"] is not None else "-"),
        ("tokens / s", f"{summary['tokens_per_s']:,.0f}"),
        ("trainable / frozen params", f"{summary['trainable_params']:,} / {summary['frozen_params']:,}"),
        ("optimizer state", gib(summary["optimizer_state_bytes"])),
        ("params + grads + state", gib(summary["model_state_bytes"])),
        (f"peak memory ({summary['peak_memory_kind']})", gib(summary["peak_memory_bytes"])),
        ("run folder", summary["run_dir"]),
    ]
    width = max(len(name) for name, _ in rows)
    line = "─" * (width + 3 + max(len(str(value)) for _, value in rows))
    return "\n".join([line] + [f"{name:<{width}} │ {value}" for name, value in rows] + [line])
