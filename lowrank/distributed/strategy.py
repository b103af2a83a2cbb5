"""How a run spreads over ranks: one process, DDP (with an optional communication hook), or
FSDP2. The training loop asks its :class:`Strategy` for the few things that differ — wrapping the
model, gradient sync during accumulation, the global gradient norm, the finite-state check, the
validation shard and the checkpoint format — and is otherwise the same loop.

* ``ddp`` (default): PyTorch's DDP when ``WORLD_SIZE > 1``; ``--comm`` registers a communication
  hook (:mod:`.comm`: PyTorch's ``bf16`` / ``fp16`` / ``powersgd``, our ``projected``, or
  ``onebit`` with :class:`~lowrank.distributed.onebit.OneBitAdam` as the optimizer) and the bytes
  it sends are logged per step. Checkpoints: one ``model.safetensors`` + ``optimizer.pt`` written
  by rank 0 (with ``onebit`` its state without the error-feedback buffers, which differ per rank:
  each rank writes its own, ``onebit_errors.rank<r>.pt``, into the same checkpoint).
* ``fsdp2``: ``fully_shard`` per decoder layer and at the root (:mod:`.fsdp`), bf16 compute with
  fp32 gradient reduction on GPU, fp32 on CPU; checkpoints through ``torch.distributed.checkpoint``
  (:mod:`.dcp`), which reshard on load, so a run can resume on another number of ranks.
"""

from __future__ import annotations

import contextlib
import io
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..errors import UsageError
from .setup import DistInfo, launched_by_torchrun, wrap_ddp

__all__ = ["STRATEGIES", "COMMS", "Strategy", "make_strategy", "check_comm"]

STRATEGIES = ("ddp", "fsdp2")
COMMS = ("none", "bf16", "fp16", "powersgd", "projected", "onebit")


def check_comm(comm: str, strategy: str, method) -> None:
    """What ``--comm`` and ``--strategy`` can serve, decided from the method before any work (one-line errors)."""
    if comm not in COMMS:
        raise UsageError(f"--comm must be one of {', '.join(COMMS)}, got {comm!r}")
    if strategy not in STRATEGIES:
        raise UsageError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if comm != "none" and strategy != "ddp":
        raise UsageError(f"--comm {comm} is a DDP communication hook; FSDP2 reduce-scatters its gradients itself: "
                         "drop --comm or use --strategy ddp")
    if strategy == "fsdp2" and method.restarts is not None and method.restarts.rotate_moments:
        raise UsageError(f"method {method.name} sets restarts.rotate_moments, which --strategy fsdp2 cannot serve: a "
                         "factor map mixes the rows of A, which FSDP2 shards over the ranks; use --strategy ddp, or "
                         "--set restarts.rotate_moments=false")
    matrix = method.optimizer.matrix
    if comm == "projected":
        if matrix.get("projection") not in ("svd", "randomized"):
            raise UsageError(f"--comm projected sends GaLore-style projected gradients, but method {method.name} has no "
                             "svd/randomized projection (optimizer.matrix.projection); pick galore or fira, or another --comm")
    if comm == "onebit":
        why = onebit_refusal(method)
        if why:
            from ..methods import available_methods, load_method

            servable = [name for name in available_methods() if not onebit_refusal(load_method(name))]
            raise UsageError(f"--comm onebit cannot serve method {method.name}: {why}; pick {', '.join(servable)}")


def onebit_refusal(method) -> str | None:
    """Why 1-bit Adam cannot stand in for ``method``'s optimizer (``None``: it can). It replaces
    Adam: ``adamw`` (the dense model, the paper's own setting) and ``projected_adamw`` without the
    options that change Adam's step; Muon's orthogonalized momentum is not Adam's."""
    if method.optimizer.name not in ("adamw", "projected_adamw"):
        return f"1-bit Adam replaces Adam, and this method's optimizer is {method.optimizer.name}"
    from ..optim import OPTION_DEFAULTS

    # what makes ProjectedAdamW's step differ from plain Adam's, each compared with its off value
    # (``is not``-style: ``True == 1.0`` in Python, so a set of "off" values would let flags through)
    keys = ("projection", "density", "spike_threshold", "adaptive_clip", "norm_scaling", "state_bits")
    changed = sorted({k for k in keys for group in (method.optimizer.matrix, method.optimizer.other)
                      if k in group and group[k] != OPTION_DEFAULTS[k]})
    if changed:
        return (f"1-bit Adam compresses the momentum of plain Adam, and this method's optimizer is not plain Adam (it sets "
                f"{', '.join(changed)})")
    return None


def powersgd_start_step(compress_from: int) -> int:
    """PowerSGD's ``start_powerSGD_iter`` for ``--freeze-step`` ``compress_from``: at least 2,
    since DDP rebuilds its buckets after the first step."""
    return max(2, compress_from)


class Strategy:
    """The single-process / DDP behaviour; :class:`FSDP2Strategy` overrides what differs."""

    name = "ddp"
    sharded = False

    def __init__(self, info: DistInfo, device: torch.device, comm: str = "none", precision: str = "fp32") -> None:
        self.info, self.device, self.comm, self.precision = info, device, comm, precision
        self.comm_stats = None

    # ------------------------------------------------------------------ model and optimizer

    def prepare(self, model: nn.Module) -> nn.Module:
        """The module the forward pass goes through (DDP wrapper or the model itself)."""
        return wrap_ddp(model, self.info, self.device)

    def attach(self, module: nn.Module, optimizer: torch.optim.Optimizer, start_step: int, *, compress_from: int = 1,
               layerwise=None) -> None:
        """After the optimizer exists: the communication hook (DDP with ``--comm``). ``compress_from``:
        the step compression starts (PowerSGD: :func:`powersgd_start_step`). ``layerwise``: a
        :class:`~lowrank.run.layerwise.LayerwiseStep`, hooked where this strategy completes a
        gradient (DDP: after each bucket's all-reduce; one process: on each parameter)."""
        if layerwise is not None and not self.info.enabled:
            layerwise.hook_parameters()
        if (self.comm != "none" or layerwise is not None) and self.info.enabled:
            from .comm import register_comm_hook

            options = {"start_powerSGD_iter": powersgd_start_step(compress_from)} if self.comm == "powersgd" else {}
            after_reduce = layerwise.step_bucket if layerwise is not None else None
            try:
                self.comm_stats = register_comm_hook(module, self.comm, optimizer=optimizer, start_step=start_step,
                                                     after_reduce=after_reduce, **options)
            except ValueError as error:
                raise UsageError(f"--comm {self.comm}: {error}") from None

    def sum_over_ranks(self):
        """How a layerwise step sums a squared gradient norm over the ranks (``None``: each rank
        holds whole gradients)."""
        return None

    def sync_context(self, module: nn.Module, last_micro_batch: bool):
        """Gradient sync only on the last micro-batch of an accumulation."""
        if self.info.enabled and not last_micro_batch:
            return module.no_sync()
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ numbers every rank agrees on

    def grad_norm(self, norm: torch.Tensor) -> float:
        """The global gradient norm as a float. With ``onebit`` after its warm-up each rank holds
        its own gradient, so a non-finite norm anywhere makes every rank see NaN (the skip
        decision must be the same everywhere: 1-bit Adam's step is a collective)."""
        value = float(norm)
        if self.comm == "onebit" and self.info.enabled and self.any_rank(not torch.isfinite(torch.tensor(value))):
            return float("nan")
        return value

    def any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any rank (so every rank takes the same decision)."""
        if not self.info.enabled:
            return flag
        value = torch.tensor(float(flag), device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def local_tensors(self, tensors):
        """The tensors a finite check must look at on this rank (all of them, or the local shards)."""
        return tensors

    def validation_batches(self, valid: torch.Tensor, batch_size: int) -> Iterator[tuple[torch.Tensor, bool]]:
        """This rank's validation batches, each with whether its loss counts: chunks ``rank,
        rank + w, ...`` of ``valid``, so the ranks together see every chunk once (the summed loss
        equals one process's)."""
        shard = valid[self.info.rank :: self.info.world_size]
        for start in range(0, len(shard), batch_size):
            yield shard[start : start + batch_size], True

    def comm_record(self) -> dict[str, Any]:
        return self.comm_stats.record() if self.comm_stats is not None else {}

    def comm_state(self) -> dict[str, int]:
        """The byte counter's part of a checkpoint (``comm_bytes_total`` continues on resume)."""
        return self.comm_stats.state_dict() if self.comm_stats is not None else {}

    def load_comm_state(self, state: dict[str, int] | None) -> None:
        if self.comm_stats is not None and state:
            self.comm_stats.load_state_dict(state)

    # ------------------------------------------------------------------ checkpoints

    def save(self, root: Path, step: int, *, model, optimizer, trainer_state: dict, meta: dict, keep: int) -> None:
        from ..run.checkpoint import save_checkpoint

        if self.comm == "onebit" and self.info.enabled:
            self._save_onebit(root, step, model=model, optimizer=optimizer, trainer_state=trainer_state,
                              meta={**meta, "strategy": self.name}, keep=keep)
        elif self.info.main:
            save_checkpoint(root, step, model=model, optimizer=optimizer, trainer_state=trainer_state,
                            meta={**meta, "strategy": self.name}, keep=keep)

    def _save_onebit(self, root: Path, step: int, *, model, optimizer, trainer_state: dict, meta: dict, keep: int) -> None:
        """1-bit Adam's error feedback differs per rank, the rest of its state does not: rank 0
        writes the shared state once (``optimizer.pt``), each rank its error buffers as its own
        shard (:func:`onebit_shard_name`), staged beside the checkpoint and moved into it by rank 0
        before it is published (atomically, with the other files' checksums). Nothing is gathered:
        a rank's buffers go from its memory to the (shared) disk."""
        from ..files import atomic_write_bytes
        from ..run.checkpoint import save_checkpoint, step_dir

        staging = Path(root) / f".tmp-onebit-{step_dir(root, step).name}"  # .tmp-*: swept by save_checkpoint
        staging.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save(optimizer.error_state_dict(), buffer)
        atomic_write_bytes(staging / onebit_shard_name(self.info.rank), buffer.getvalue())
        dist.barrier()
        if self.info.main:
            shards = tuple(staging / onebit_shard_name(r) for r in range(self.info.world_size))
            save_checkpoint(root, step, model=model, optimizer=optimizer, trainer_state=trainer_state, meta=meta, keep=keep,
                            optimizer_state=optimizer.shared_state_dict(), extra_files=shards)
            shutil.rmtree(staging, ignore_errors=True)
        dist.barrier()  # the checkpoint is complete before any rank goes on (and may save again)

    def check_resumable(self, checkpoint: Path) -> None:
        """Refuse, before any work, a checkpoint this strategy cannot load (DDP loads both kinds)."""

    def load(self, checkpoint: Path, state: dict, *, model, optimizer) -> None:
        from ..run.checkpoint import load_checkpoint
        from .dcp import is_sharded_checkpoint, load_sharded_checkpoint

        if is_sharded_checkpoint(checkpoint):  # an FSDP2 run's: DCP loads it into the whole model too
            load_sharded_checkpoint(checkpoint, model, optimizer)
            return
        load_checkpoint(checkpoint, model, optimizer, device=self.device)
        shards = sorted(checkpoint.glob(onebit_shard_name("*")))
        states = state.get("rank_optimizer_states")  # checkpoints before per-rank shards: every rank's whole state
        saved_ranks = len(shards) or len(states or [])
        if saved_ranks and saved_ranks != self.info.world_size:
            raise UsageError(f"checkpoint {checkpoint} holds 1-bit Adam error buffers of {saved_ranks} ranks (their error "
                             f"feedback is per rank); resume --comm onebit on {saved_ranks} processes")
        if shards:
            errors = torch.load(checkpoint / onebit_shard_name(self.info.rank), weights_only=True, map_location=self.device)
            optimizer.load_error_state_dict(errors)
        elif states:
            optimizer.load_state_dict(states[self.info.rank])


def onebit_shard_name(rank: int | str) -> str:
    """The file of a rank's 1-bit Adam error buffers in a DDP checkpoint."""
    return f"onebit_errors.rank{rank}.pt"


class FSDP2Strategy(Strategy):
    name = "fsdp2"
    sharded = True

    def prepare(self, model: nn.Module) -> nn.Module:
        from .fsdp import shard_model

        if not any(getattr(p, "_local_tensor", None) is not None for p in model.parameters()):
            shard_model(model, mixed_precision=self.device.type == "cuda" and self.precision == "bf16-mixed")
        return model

    def attach(self, module, optimizer, start_step, *, compress_from: int = 1, layerwise=None) -> None:
        # FSDP2 calls the sharded parameters' post-accumulate-grad hooks after its reduce-scatter
        if layerwise is not None:
            layerwise.hook_parameters()

    def sum_over_ranks(self):
        def summed(value: torch.Tensor) -> torch.Tensor:
            dist.all_reduce(value)
            return value

        return summed

    def sync_context(self, module: nn.Module, last_micro_batch: bool):
        module.set_requires_gradient_sync(last_micro_batch)
        return contextlib.nullcontext()

    def grad_norm(self, norm) -> float:
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def local_tensors(self, tensors):
        return [(name, t.to_local() if hasattr(t, "to_local") else t) for name, t in tensors]

    def validation_batches(self, valid: torch.Tensor, batch_size: int) -> Iterator[tuple[torch.Tensor, bool]]:
        """DDP's batches, every chunk counted, then as many uncounted repeats of a first chunk as
        make every rank run the same number of forward passes (each one all-gathers the layers):
        ``ceil(ceil(len/w) / batch_size)`` on every rank."""
        own = 0
        for batch, counted in super().validation_batches(valid, batch_size):
            own += 1
            yield batch, counted
        per_rank = -(-len(valid) // self.info.world_size)  # ceilings: rank 0 has the most chunks
        most = -(-per_rank // batch_size)
        for _ in range(most - own):
            yield valid[:1], False

    def save(self, root: Path, step: int, *, model, optimizer, trainer_state: dict, meta: dict, keep: int) -> None:
        from .dcp import save_sharded_checkpoint

        save_sharded_checkpoint(root, model, optimizer, trainer_state, step=step, meta={**meta, "strategy": self.name},
                                keep=keep)

    def check_resumable(self, checkpoint: Path) -> None:
        if not (checkpoint / "dcp").is_dir():
            raise UsageError(f"checkpoint {checkpoint} was written without --strategy fsdp2 (one full state dict, not a DCP "
                             "checkpoint); resume it with --strategy ddp, or start the FSDP2 run afresh")

    def load(self, checkpoint: Path, state: dict, *, model, optimizer) -> None:
        from .dcp import load_sharded_checkpoint

        load_sharded_checkpoint(checkpoint, model, optimizer)  # refused earlier if not DCP (check_resumable)


def make_strategy(name: str, info: DistInfo, device: torch.device, *, comm: str, precision: str) -> Strategy:
    if name == "fsdp2":
        if not launched_by_torchrun():
            raise UsageError("--strategy fsdp2 shards the model over the ranks of a process group: start with "
                             "torchrun --nproc_per_node N -m lowrank pretrain ... (or drop --strategy for one process)")
        return FSDP2Strategy(info, device, comm, precision)
    return Strategy(info, device, comm, precision)
