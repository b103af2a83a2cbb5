"""What one run needs: :class:`TrainConfig`, and the checks that need nothing but it."""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..errors import UsageError
from ..methods import Method
from ..precision import PARAM_DTYPES, PRECISIONS, compute_dtype

__all__ = ["TrainConfig", "validate_config", "check_output_paths", "check_writable_folder", "check_writable_file",
           "total_steps", "autocast_for"]


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
    # None: the preset's training.param_dtype (fp32 unless the preset says otherwise)
    param_dtype: str | None = None
    device: str = "auto"
    compile: bool = False
    # every decoder layer recomputed in backward (lowrank.checkpointing)
    activation_checkpointing: bool = False
    # each parameter updated inside backward, its gradient freed at once (lowrank.run.layerwise)
    layerwise_step: bool = False
    progress: bool = True
    plot: bool = True
    cache_dir: str | None = None
    text_field: str = "text"
    strategy: str = "ddp"
    comm: str = "none"
    freeze_step: int | None = None
    dist_timeout: float = 600.0
    overrides: dict[str, Any] = field(default_factory=dict)
    # Python API only: build the optimizer yourself (e.g. a peer library's) from the model and the
    # parsed preset; the preset's schedule, restarts and everything else still apply.
    optimizer_factory: Callable[[nn.Module, Method], torch.optim.Optimizer] | None = field(default=None, repr=False)

    def run_dir(self) -> Path:
        return Path(self.out) if self.out else Path("runs") / f"{Path(self.method).stem}-{Path(self.model).stem}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_config(cfg: TrainConfig) -> None:
    """Checks that need nothing but the config (values, types, output paths), so a bad run stops
    before any data or model work and before anything is written."""
    if cfg.max_steps is None and cfg.max_tokens is None:
        raise UsageError("give --max-steps N or --max-tokens N (the run's budget)")
    if cfg.max_steps is not None and cfg.max_tokens is not None:
        raise UsageError("give exactly one of --max-steps and --max-tokens")
    for name in ("max_steps", "max_tokens"):
        value = getattr(cfg, name)
        if value is not None and (not _is_int(value) or value <= 0):
            raise UsageError(f"--{name.replace('_', '-')} must be a positive whole number, got {value!r}")
    for name in ("batch_size", "grad_accum", "seq_len", "eval_tokens", "keep_checkpoints", "log_every"):
        value = getattr(cfg, name)
        if not _is_int(value) or value <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive whole number, got {value!r}")
    for name in ("eval_every", "save_every"):
        value = getattr(cfg, name)
        if not _is_int(value) or value < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be a whole number >= 0 (0 = only at the end), got {value!r}")
    for name in ("vocab_size", "rank", "cycle_length"):
        value = getattr(cfg, name)
        if value is not None and (not _is_int(value) or value <= 0):
            raise UsageError(f"--{name.replace('_', '-')} must be a positive whole number, got {value!r}")
    if cfg.lr is not None and not (isinstance(cfg.lr, (int, float)) and math.isfinite(cfg.lr) and cfg.lr > 0):
        raise UsageError(f"--lr must be a finite number > 0, got {cfg.lr!r}")
    if not _is_int(cfg.seed) or not 0 <= cfg.seed < 2**63:
        raise UsageError(f"--seed must be a whole number in [0, 2**63), got {cfg.seed!r}")
    if not (isinstance(cfg.dist_timeout, (int, float)) and math.isfinite(cfg.dist_timeout) and cfg.dist_timeout > 0):
        raise UsageError(f"--dist-timeout must be a positive number of seconds, got {cfg.dist_timeout!r}")
    if cfg.freeze_step is not None and (not _is_int(cfg.freeze_step) or cfg.freeze_step <= 0):
        raise UsageError(f"--freeze-step must be a positive whole number of steps, got {cfg.freeze_step!r}")
    if cfg.freeze_step is not None and cfg.comm not in ("onebit", "powersgd"):
        raise UsageError("--freeze-step is the full-precision warm-up of a compressing --comm: it needs --comm onebit "
                         "or --comm powersgd")
    if cfg.param_dtype is not None and cfg.param_dtype not in PARAM_DTYPES:
        raise UsageError(f"--param-dtype must be one of {', '.join(PARAM_DTYPES)}, got {cfg.param_dtype!r}")
    if cfg.precision not in PRECISIONS:
        raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}, got {cfg.precision!r}")
    for flag in ("activation_checkpointing", "layerwise_step"):
        if not isinstance(getattr(cfg, flag), bool):
            raise UsageError(f"{flag} must be True or False, got {getattr(cfg, flag)!r}")
    if not isinstance(cfg.overrides, dict):
        raise UsageError(f"overrides must be a dict of dotted keys, got {type(cfg.overrides).__name__}")
    check_output_paths(cfg)


def check_writable_folder(path: Path, option: str) -> None:
    """``path`` is (or can become) a folder we can write in; a one-line UsageError otherwise."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise UsageError(f"{option} {path} is a file, not a folder; pick a folder")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise UsageError(f"{option} {path}: cannot create or write there ({existing} is a file); pick another folder")
    try:
        # Ask the file system itself: permission bits say yes for root everywhere, also in /proc.
        os.rmdir(tempfile.mkdtemp(prefix=".lowrank-probe-", dir=existing))
    except OSError as error:
        raise UsageError(f"{option} {path}: cannot create or write there ({existing}: {error.strerror or error}); "
                         "pick another folder") from None


def check_writable_file(path: Path, option: str) -> None:
    """``path`` names a file (not a folder) that can be written, its folder created if needed."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise UsageError(f"{option} {path} is a folder; give a file name, e.g. {path / 'summary.json'}")
    check_writable_folder(path.parent, f"{option}'s folder")


def check_output_paths(cfg: TrainConfig) -> None:
    """``--out``, ``--cache-dir`` and ``--json-out`` can be written, before any work is done."""
    check_writable_folder(cfg.run_dir(), "--out")
    if cfg.cache_dir:
        check_writable_folder(Path(cfg.cache_dir), "--cache-dir")
    if cfg.json_out:
        check_writable_file(Path(cfg.json_out), "--json-out")


def total_steps(cfg: TrainConfig, tokens_per_step: int) -> int:
    """The run's length in optimizer steps, from ``--max-steps`` or ``--max-tokens``."""
    steps = cfg.max_steps if cfg.max_steps is not None else math.ceil(cfg.max_tokens / tokens_per_step)
    if steps <= 0:
        raise UsageError(f"the run has {steps} steps; raise --max-steps / --max-tokens")
    return steps


def autocast_for(device: torch.device, precision: str, storage: torch.dtype = torch.float32):
    """``(context manager, compute label)``: the compute dtype of :func:`lowrank.precision.compute_dtype`
    as a context (autocast only for bf16 compute over fp32 storage) and its name for the logs:
    ``fp32``, ``bf16`` (bf16 storage computing in bf16) or ``bf16-mixed`` (autocast)."""
    dtype, autocast = compute_dtype(device, storage, precision)
    if autocast:
        return torch.autocast(device.type, dtype=torch.bfloat16), "bf16-mixed"
    return contextlib.nullcontext(), "bf16" if dtype == torch.bfloat16 else "fp32"
