"""The run folder: its layout, the checkpoint metadata schema, and the resume / overwrite policy.

Layout of ``<run>/`` (``--out``)::

    config.json          what the run was started with (config, resolved method, data description)
    metrics.jsonl        one JSON record per logged step, event and evaluation
    summary.json         the final summary (also printed as a table)
    loss.png             train / validation loss curves
    tensorboard/         the same metrics, when TensorBoard is installed
    tokenizer/           the tokenizer the run trained with (so export finds it)
    checkpoints/         step_NNNNNNNN/ folders and a ``latest`` pointer (:mod:`.checkpoint`)

A checkpoint's ``meta.json`` (:class:`CheckpointMeta`) holds the run's configuration, the method
as resolved (every override applied), the model's Hugging Face config and whether the model was
wrapped at that step: enough to rebuild the trained model without the command line
(``lowrank export``). When the data cache is the run folder (the default), the trained BPE is
cached in ``<run>/tokenizer`` already, which is where this layout wants it.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..files import atomic_write_bytes
from .checkpoint import checkpoint_step, list_checkpoints, read_trainer_state, resolve_checkpoint

__all__ = ["RunFolder", "CheckpointMeta", "ResumePoint", "structural_differences"]


@dataclass(frozen=True)
class CheckpointMeta:
    """The schema of a checkpoint's ``meta.json``."""

    config: dict[str, Any]
    method: dict[str, Any]
    model_config: dict[str, Any]
    wrapped: bool
    step: int

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config, "method": self.method, "model_config": self.model_config, "wrapped": self.wrapped,
                "step": self.step}

    @classmethod
    def read(cls, checkpoint: Path) -> CheckpointMeta:
        """Parse ``checkpoint/meta.json``; a damaged or foreign file is a one-line UsageError."""
        try:
            data = json.loads((checkpoint / "meta.json").read_text())
            meta = cls(config=dict(data.get("config") or {}), method=dict(data["method"]),
                       model_config=dict(data["model_config"]), wrapped=bool(data.get("wrapped")),
                       step=int(data.get("step", 0)))
        except (ValueError, KeyError, TypeError, AttributeError, OSError) as error:  # AttributeError: not a JSON object
            raise UsageError(f"checkpoint {checkpoint}: meta.json is not a lowrank checkpoint's ({type(error).__name__}: "
                             f"{str(error).splitlines()[0] if str(error) else ''})") from None
        if "model_type" not in meta.model_config:
            raise UsageError(f"checkpoint {checkpoint}: meta.json has no model_config.model_type; it is not a lowrank checkpoint's")
        return meta


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: data}


# What decides the shapes of the weights and the optimizer state: a resume must keep these.
STRUCTURE_KEYS = ("lowrank", "optimizer.name", "optimizer.target_modules", "optimizer.exclude_modules",
                  "optimizer.matrix.projection", "optimizer.matrix.rank", "optimizer.matrix.density",
                  "optimizer.matrix.residual", "optimizer.matrix.state_bits", "optimizer.other.state_bits")


def structural_differences(saved_method: dict[str, Any], method: dict[str, Any], saved_model: dict[str, Any],
                           model: dict[str, Any]) -> list[str]:
    """``key: saved → now`` for every setting that changes a shape between a checkpoint and this run."""
    old, new = _flatten(saved_method), _flatten(method)
    keys = sorted(k for k in set(old) | set(new) if any(k == s or k.startswith(s + ".") for s in STRUCTURE_KEYS))
    changes = [f"{k}: {old.get(k)!r} → {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]
    shape_keys = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "vocab_size", "tie_word_embeddings")
    changes += [f"model.{k}: {saved_model.get(k)!r} → {model.get(k)!r}" for k in shape_keys if saved_model.get(k) != model.get(k)]
    return changes


@dataclass(frozen=True)
class ResumePoint:
    """The checkpoint a run continues from and its trainer state (step, controller, data, RNG)."""

    checkpoint: Path
    state: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.state["step"])

    def meta(self) -> CheckpointMeta:
        return CheckpointMeta.read(self.checkpoint)


class RunFolder:
    """One run's folder (see the module docstring for the layout)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    checkpoints = property(lambda self: self.path / "checkpoints")
    tokenizer = property(lambda self: self.path / "tokenizer")
    metrics = property(lambda self: self.path / "metrics.jsonl")
    config = property(lambda self: self.path / "config.json")
    summary = property(lambda self: self.path / "summary.json")
    loss_plot = property(lambda self: self.path / "loss.png")
    tensorboard = property(lambda self: self.path / "tensorboard")

    @staticmethod
    def of_checkpoint(checkpoint: Path) -> RunFolder:
        """The run folder a ``checkpoints/step_N`` folder belongs to."""
        checkpoint = Path(checkpoint)
        return RunFolder(checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent)

    def open(self, *, resume: str | None, overwrite: bool, world_size: int) -> ResumePoint | None:
        """Apply the resume / overwrite policy before anything is written; return where to resume.

        * ``resume`` (``latest`` or a path): continue from that checkpoint. On another number of
          processes only with a packed (finite) corpus, whose loader maps the position; a
          streamed corpus's position is per rank.
        * a fresh run refuses a folder holding checkpoints unless ``overwrite``; they are
          deleted by :meth:`clear_checkpoints` when training starts, after every other check.
        * ``resume`` and ``overwrite`` together are a contradiction.
        """
        if resume and overwrite:
            raise UsageError("--resume continues a run and --overwrite starts it afresh: give one of them")
        if resume:
            checkpoint = resolve_checkpoint(resume, self.path)
            state = read_trainer_state(checkpoint)
            written_by = int(state.get("world_size", 1))
            packed = all(isinstance(d, dict) and d.get("kind") == "packed" for d in state.get("data") or [None])
            if written_by != world_size and not packed:
                raise UsageError(
                    f"checkpoint {checkpoint} was written by {written_by} processes from a streamed corpus, whose position "
                    "is per process; resume with the same number of processes"
                )
            return ResumePoint(checkpoint, state)
        if list_checkpoints(self.checkpoints) and not overwrite:
            raise UsageError(
                f"{self.path} already holds checkpoints of an earlier run; continue it with --resume latest, "
                "start afresh with --overwrite, or pick another --out"
            )
        return None

    def remove_stale_files(self) -> None:
        """What a run killed inside a write leaves behind: the temporary ``latest.tmp<pid>`` of a
        pointer swap and ``.tmp-step_N-<pid>`` folders of a checkpoint (``latest`` itself was never
        touched: :func:`~lowrank.files.atomic_write_bytes`)."""
        for stale in [*self.checkpoints.glob("latest.tmp*"), *self.checkpoints.glob(".tmp-*")]:
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)

    def drop_checkpoints_after(self, step: int) -> list[Path]:
        """Remove the checkpoints of steps after ``step`` (written from a state that went wrong) and
        point ``latest`` at the newest one left, so that ``--resume latest`` never picks them.
        Returns the checkpoints left, oldest first."""
        kept = []
        for checkpoint in list_checkpoints(self.checkpoints):
            if checkpoint_step(checkpoint) > step:
                shutil.rmtree(checkpoint, ignore_errors=True)
            else:
                kept.append(checkpoint)
        pointer = self.checkpoints / "latest"
        if kept:
            atomic_write_bytes(pointer, (kept[-1].name + "\n").encode())
        else:
            pointer.unlink(missing_ok=True)
        return kept

    def clear_checkpoints(self) -> None:
        """A fresh run with ``--overwrite``: drop the earlier run's checkpoints (and its metrics)."""
        if self.checkpoints.exists():
            shutil.rmtree(self.checkpoints)

    def write_config(self, record: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self.config.write_text(json.dumps(record, indent=2, default=str) + "\n")

    def save_tokenizer(self, tokenizer) -> None:
        """Keep the run self-contained: ``lowrank export`` finds the tokenizer here even when it
        came from the hub or another path."""
        if not (self.tokenizer / "tokenizer_config.json").is_file():
            tokenizer.save_pretrained(self.tokenizer)

    def write_summary(self, summary: dict[str, Any]) -> None:
        """``summary.json``: strict JSON (a NaN or infinity is written as null)."""
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in summary.items()}
        self.summary.write_text(json.dumps(clean, indent=2, allow_nan=False) + "\n")
