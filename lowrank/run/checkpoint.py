"""Atomic training checkpoints.

A checkpoint is a folder ``<run>/checkpoints/step_<N>/`` holding

* ``model.safetensors`` — the (unwrapped) model's state dict, via ``safetensors``;
* ``optimizer.pt`` — ``optimizer.state_dict()`` (tensors and plain numbers only);
* ``trainer_state.pt`` — step, controller, data position and RNG states;
* ``meta.json`` — the run's configuration, human-readable, and the sha256 of the other three
  files (``checksums``), verified before a checkpoint is loaded: a file changed after it was
  written (a disk error, a partial copy, an edit) is reported, never silently resumed from.

It is written into a hidden temporary folder and renamed into place, and only then is the
``latest`` pointer replaced (also by rename), so a crash at any moment leaves the previous
checkpoint complete and ``latest`` pointing at it. Every ``.pt`` file loads with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_model

from ..errors import UsageError, first_line
from ..files import atomic_write_bytes, fsync_file

__all__ = [
    "save_checkpoint",
    "read_trainer_state",
    "load_checkpoint",
    "load_weights",
    "resolve_checkpoint",
    "list_checkpoints",
    "step_dir",
    "checkpoint_step",
    "publish_checkpoint",
    "verify_checksums",
    "file_sha256",
    "CHECKPOINT_FILES",
]

CHECKPOINT_FILES = ("model.safetensors", "optimizer.pt", "trainer_state.pt", "meta.json")
_CHECKSUMMED = CHECKPOINT_FILES[:3]
_PREFIX = "step_"


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 1 MiB blocks (just written, it comes from the page cache)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def step_dir(root: Path, step: int) -> Path:
    """The folder of checkpoint ``step`` under ``root`` (``step_00000042``)."""
    return root / f"{_PREFIX}{step:08d}"


def checkpoint_step(path: Path) -> int:
    """The step of checkpoint folder ``path`` (``step_00000042`` → 42)."""
    return int(Path(path).name[len(_PREFIX):])


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``root`` (a ``checkpoints`` folder), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX))


def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    meta: dict[str, Any],
    keep: int = 2,
    optimizer_state: dict[str, Any] | None = None,
    extra_files: tuple[Path, ...] = (),
) -> Path:
    """Write checkpoint ``step`` atomically and prune all but the newest ``keep``.

    ``optimizer_state``: what ``optimizer.pt`` holds (default ``optimizer.state_dict()``).
    ``extra_files``: files already written (e.g. each rank's shard of per-rank state), moved into
    the checkpoint before it is published and checksummed with the others."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = step_dir(root, step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))
    torch.save(optimizer.state_dict() if optimizer_state is None else optimizer_state, tmp / "optimizer.pt")
    torch.save(trainer_state, tmp / "trainer_state.pt")
    for extra in extra_files:
        os.replace(extra, tmp / Path(extra).name)
    checksums = {name: file_sha256(tmp / name) for name in (*_CHECKSUMMED, *(Path(e).name for e in extra_files))}
    (tmp / "meta.json").write_text(json.dumps({**meta, "step": step, "checksums": checksums}, indent=2, default=str) + "\n")
    for name in (*CHECKPOINT_FILES, *(Path(e).name for e in extra_files)):
        fsync_file(tmp / name)
    publish_checkpoint(tmp, final, keep)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return final


def publish_checkpoint(tmp: Path, final: Path, keep: int) -> None:
    """Rename the complete ``tmp`` folder to ``final``, point ``latest`` at it (by rename), and
    prune all but the newest ``keep`` checkpoints: the last steps of every checkpoint format."""
    root = final.parent
    if final.exists():  # re-saving the same step (e.g. after a resume): replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    atomic_write_bytes(root / "latest", (final.name + "\n").encode())
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def resolve_checkpoint(resume: str, run_dir: str | os.PathLike) -> Path:
    """The checkpoint folder ``--resume`` means: ``latest`` (in ``run_dir``), a run folder, a
    ``checkpoints`` folder, or a ``step_N`` folder. Raises :class:`UsageError` when there is none."""
    run_dir = Path(run_dir)
    if resume == "latest":
        candidates = [run_dir / "checkpoints"]
    else:
        path = Path(resume)
        if not path.exists():
            raise UsageError(f"--resume {resume}: no such folder; pass 'latest', a run folder or a checkpoint folder")
        candidates = [path, path / "checkpoints"] if not path.name.startswith(_PREFIX) else [path]
    for candidate in candidates:
        if candidate.name.startswith(_PREFIX) and candidate.is_dir():
            return candidate
        pointer = candidate / "latest"
        if pointer.is_file():
            target = candidate / pointer.read_text().strip()
            if target.is_dir():
                return target
        found = list_checkpoints(candidate)
        if found:
            return found[-1]
    where = run_dir / "checkpoints" if resume == "latest" else Path(resume)
    raise UsageError(f"--resume {resume}: no checkpoint found in {where}; train with --save-every N first, or drop --resume")


def _corrupt(path: Path, error: Exception) -> UsageError:
    return UsageError(f"checkpoint {path} is corrupt ({first_line(error)}); resume from an earlier one with --resume PATH")


def verify_checksums(path: Path) -> None:
    """Compare every file of checkpoint ``path`` with the sha256 its ``meta.json`` recorded
    (checkpoints of earlier versions have none: nothing to compare)."""
    try:
        recorded = json.loads((path / "meta.json").read_text()).get("checksums") or {}
    except (ValueError, OSError, AttributeError) as error:
        raise _corrupt(path, error) from None
    for name, digest in recorded.items():
        if not (path / name).is_file() or file_sha256(path / name) != digest:
            raise UsageError(
                f"checkpoint {path} is corrupt: {name} does not match the checksum written with it (the file changed after "
                "it was saved: a disk error, a partial copy or an edit); resume from an earlier checkpoint with --resume PATH"
            )


def read_trainer_state(path: Path) -> dict[str, Any]:
    """Check that checkpoint ``path`` is complete and unchanged since it was written, and return
    its trainer state (step, controller, data position, RNG). Raises :class:`UsageError` if it is
    incomplete, altered or corrupt."""
    # A sharded (FSDP2 / DCP) checkpoint has its tensors under dcp/ (lowrank.distributed.dcp).
    needed = ("dcp", "optimizer_meta.pt", "trainer_state.pt", "meta.json") if (path / "dcp").is_dir() else CHECKPOINT_FILES
    missing = [name for name in needed if not (path / name).exists()]
    if missing:
        raise UsageError(f"checkpoint {path} is incomplete (missing {', '.join(missing)}); resume from an earlier one with --resume PATH")
    verify_checksums(path)
    try:
        state = torch.load(path / "trainer_state.pt", weights_only=True, map_location="cpu")
    except Exception as error:  # noqa: BLE001 - any decoding failure means the file is damaged
        raise _corrupt(path, error) from None
    if not isinstance(state, dict) or "step" not in state:
        raise UsageError(f"checkpoint {path}: trainer_state.pt is not a lowrank trainer state; resume from a lowrank run")
    return state


def load_weights(path: Path, model: torch.nn.Module, *, device=None, weights: dict[str, torch.Tensor] | None = None) -> None:
    """Load ``path/model.safetensors`` (or the given ``weights``, e.g. a sharded checkpoint's,
    gathered) into ``model``: every key present, every shape equal, or a one-line
    :class:`UsageError` saying which key differs."""
    if weights is None:
        try:
            weights = load_file(str(path / "model.safetensors"), device=str(device or "cpu"))
        except Exception as error:  # noqa: BLE001 - any decoding failure means the file is damaged
            raise _corrupt(path, error) from None
    expected = model.state_dict()
    missing_keys = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing_keys or unexpected:
        raise UsageError(
            f"checkpoint {path} does not match this model (missing {missing_keys[:3]}, unexpected {unexpected[:3]}); "
            "use the --model and --method the run was started with"
        )
    for name, tensor in weights.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise UsageError(
                f"checkpoint {path} does not fit this model: {name} is {tuple(tensor.shape)} there and "
                f"{tuple(expected[name].shape)} here; use the --model, --rank and --method the run was started with"
            )
    model.load_state_dict(weights, strict=True)


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, device=None) -> None:
    """Load weights and optimizer state from checkpoint ``path`` into ``model``/``optimizer``.
    Raises :class:`UsageError` if they are corrupt or do not fit."""
    try:
        optimizer_state = torch.load(path / "optimizer.pt", weights_only=True, map_location=device or "cpu")
    except Exception as error:  # noqa: BLE001
        raise _corrupt(path, error) from None
    load_weights(path, model, device=device)
    try:
        optimizer.load_state_dict(optimizer_state)
    except (ValueError, KeyError, TypeError) as error:
        raise UsageError(f"checkpoint {path}: optimizer state does not match this run ({first_line(error)}); "
                         "use the same --method") from None
