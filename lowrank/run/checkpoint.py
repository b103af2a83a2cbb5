"""Atomic training checkpoints.

A checkpoint is a folder ``<run>/checkpoints/step_<N>/`` holding

* ``model.safetensors`` — the (unwrapped) model's state dict, via ``safetensors``;
* ``optimizer.pt`` — ``optimizer.state_dict()`` (tensors and plain numbers only);
* ``trainer_state.pt`` — step, controller, data position and RNG states;
* ``meta.json`` — the run's configuration, human-readable.

It is written into a hidden temporary folder and renamed into place, and only then is the
``latest`` pointer replaced (also by rename), so a crash at any moment leaves the previous
checkpoint complete and ``latest`` pointing at it. Every ``.pt`` file loads with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from ..errors import UsageError, first_line
from ..files import atomic_write_bytes, fsync_file

__all__ = [
    "save_checkpoint",
    "read_trainer_state",
    "load_checkpoint",
    "resolve_checkpoint",
    "list_checkpoints",
    "CHECKPOINT_FILES",
]

CHECKPOINT_FILES = ("model.safetensors", "optimizer.pt", "trainer_state.pt", "meta.json")
_PREFIX = "step_"


def _step_dir(root: Path, step: int) -> Path:
    return root / f"{_PREFIX}{step:08d}"


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
) -> Path:
    """Write checkpoint ``step`` atomically and prune all but the newest ``keep``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = _step_dir(root, step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(trainer_state, tmp / "trainer_state.pt")
    (tmp / "meta.json").write_text(json.dumps({**meta, "step": step}, indent=2, default=str) + "\n")
    for name in CHECKPOINT_FILES:
        fsync_file(tmp / name)
    if final.exists():  # re-saving the same step (e.g. after a resume): replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    atomic_write_bytes(root / "latest", (final.name + "\n").encode())
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return final


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


def read_trainer_state(path: Path) -> dict[str, Any]:
    """Check that checkpoint ``path`` is complete and return its trainer state (step, controller,
    data position, RNG). Raises :class:`UsageError` if it is incomplete or corrupt."""
    missing = [name for name in CHECKPOINT_FILES if not (path / name).is_file()]
    if missing:
        raise UsageError(f"checkpoint {path} is incomplete (missing {', '.join(missing)}); resume from an earlier one with --resume PATH")
    try:
        state = torch.load(path / "trainer_state.pt", weights_only=True, map_location="cpu")
    except Exception as error:  # noqa: BLE001 - any decoding failure means the file is damaged
        raise _corrupt(path, error) from None
    if not isinstance(state, dict) or "step" not in state:
        raise UsageError(f"checkpoint {path}: trainer_state.pt is not a lowrank trainer state; resume from a lowrank run")
    return state


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, device=None) -> None:
    """Load weights and optimizer state from checkpoint ``path`` into ``model``/``optimizer``.
    Raises :class:`UsageError` if they are corrupt or do not fit."""
    try:
        optimizer_state = torch.load(path / "optimizer.pt", weights_only=True, map_location=device or "cpu")
        missing_keys, unexpected = load_model(model, str(path / "model.safetensors"), strict=False, device=str(device or "cpu"))
    except Exception as error:  # noqa: BLE001
        raise _corrupt(path, error) from None
    if missing_keys or unexpected:
        raise UsageError(
            f"checkpoint {path} does not match this model (missing {sorted(missing_keys)[:3]}, unexpected {sorted(unexpected)[:3]}); "
            "resume with the same --model and --method the run was started with"
        )
    try:
        optimizer.load_state_dict(optimizer_state)
    except (ValueError, KeyError) as error:
        raise UsageError(f"checkpoint {path}: optimizer state does not match this run ({error}); use the same --method") from None
