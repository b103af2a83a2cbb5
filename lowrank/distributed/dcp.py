"""Sharded checkpoints with ``torch.distributed.checkpoint`` (DCP), for FSDP2 runs.

A sharded checkpoint is a folder ``<run>/checkpoints/step_<N>/`` (the step-folder naming, the
``latest`` pointer and the pruning of :mod:`lowrank.run.checkpoint`, whose helpers are used
here) holding

* ``dcp/`` — DCP's files: ``.metadata`` and one ``__<rank>_0.distcp`` per writing rank, with
  every tensor of the model's and the optimizer's state dicts as given by
  ``torch.distributed.checkpoint.state_dict.get_state_dict`` (each rank writes its shards;
  replicated tensors are written once);
* ``optimizer_meta.pt`` — everything of the optimizer state dict that is not a tensor (the
  parameter groups, the per-parameter step counters), ``torch.save``\\ d by rank 0;
* ``trainer_state.pt`` — the caller's ``extra_state`` (step, controller, data position, RNG);
* ``meta.json`` — the caller's ``meta`` plus ``format: "dcp"``, the step, the world size it was
  written with, and the sha256 of every other file (``checksums``), verified before loading.

Written atomically as the one-process checkpoints are: into a hidden temporary folder, renamed
into place, then the ``latest`` pointer is replaced (by rename); a crash at any moment leaves the
previous checkpoint complete and ``latest`` pointing at it. All ranks write into the same folder
(DCP needs a file system every rank sees).

**weights_only.** DCP's own loader is *not* restricted: ``FileSystemReader.read_metadata``
reads ``.metadata`` with plain ``pickle.load``, and the default load planner reads every
non-tensor entry with ``torch.load(weights_only=False)`` (tensors themselves are read with
``weights_only=True``). So this module keeps non-tensors out of DCP (they go to
``optimizer_meta.pt`` and ``trainer_state.pt``, read with ``torch.load(weights_only=True)``),
loads DCP with a template that holds only tensors (so no non-tensor entry is ever unpickled),
and reads ``.metadata`` through :class:`SafeFileSystemReader`, whose unpickler accepts only
DCP's metadata classes and torch's dtypes and sizes. Nothing in a sharded checkpoint is
unpickled beyond what ``weights_only=True`` allows.

**Resharding.** DCP stores each tensor as chunks with their global offsets and reads, on any
world size, the overlap of the saved chunks with the chunks this run holds: a checkpoint written
by 2 ranks loads on 1 (a plain model and optimizer, no process group needed) or on 4, and a
one-process checkpoint written here loads on 2. ``ProjectedAdamW.state_dict()`` presents every
state tensor with its global shape (see :mod:`lowrank.optim.adamw`, "FSDP2"), so its state
reshards too; the step counters and subset periods are world-size independent.

**Export.** :func:`dcp_to_state_dict` rebuilds the model's whole (unsharded) state dict from the
files alone; :func:`export_model_weights` writes it as ``model.safetensors`` into the checkpoint
folder, which is what ``lowrank export`` reads (with ``meta.json``). DCP's
``format_utils.dcp_to_torch_save`` does the same conversion to a ``torch.save`` file, but through
the unrestricted loader.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save as safetensors_bytes
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict, set_model_state_dict, set_state_dict

from ..errors import UsageError, first_line
from ..files import atomic_write_bytes, fsync_file
from ..run.checkpoint import file_sha256, publish_checkpoint, step_dir

__all__ = [
    "save_sharded_checkpoint",
    "load_sharded_checkpoint",
    "is_sharded_checkpoint",
    "dcp_to_state_dict",
    "export_model_weights",
    "SafeFileSystemReader",
    "SHARDED_FILES",
]

SHARDED_FILES = ("dcp", "optimizer_meta.pt", "trainer_state.pt", "meta.json")
_FORMAT = "dcp"


# ---------------------------------------------------------------------- a restricted reader


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata`` and nothing else: its dataclasses, torch sizes, dtypes,
    layouts and memory formats, paths, and the plain containers they use."""

    _ALLOWED = {
        "torch.distributed.checkpoint.metadata": {
            "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
            "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
        },
        "torch.distributed.checkpoint.filesystem": {"_StorageInfo", "_StoragePrefix"},
        "torch": {"Size", "device", "layout", "strided", "memory_format", "contiguous_format", "preserve_format",
                  "channels_last", "channels_last_3d"},
        "torch.serialization": {"_get_layout"},  # looks a layout up by name
        "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},  # the checkpoint id
        "collections": {"OrderedDict"},
        "builtins": {"set", "frozenset", "tuple", "list", "dict"},
    }

    def find_class(self, module: str, name: str) -> Any:
        if name in self._ALLOWED.get(module, ()) or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} from a checkpoint's DCP metadata")


class SafeFileSystemReader(FileSystemReader):
    """``FileSystemReader`` whose ``.metadata`` is read with a restricted unpickler
    (:class:`_MetadataUnpickler`) instead of ``pickle.load``; the rest is DCP's."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as handle:
            metadata = _MetadataUnpickler(handle).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError(f"{self.path}: .metadata does not hold DCP metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


# ---------------------------------------------------------------------- save


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _split_optimizer_state(state_dict: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(tensors, rest)``: the optimizer state dict's tensors (for DCP) and everything else."""
    tensors = {fqn: {k: v for k, v in entry.items() if torch.is_tensor(v)} for fqn, entry in state_dict["state"].items()}
    counters = {fqn: {k: v for k, v in entry.items() if not torch.is_tensor(v)} for fqn, entry in state_dict["state"].items()}
    return {"state": tensors}, {"state": counters, "param_groups": state_dict["param_groups"]}


def save_sharded_checkpoint(
    root: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    extra_state: dict[str, Any],
    *,
    step: int | None = None,
    meta: dict[str, Any] | None = None,
    keep: int = 2,
) -> Path:
    """Write checkpoint ``step`` (default ``extra_state["step"]``) of an FSDP2 (or one-process)
    ``model`` and ``optimizer`` into ``root`` (a ``checkpoints`` folder) atomically, and prune all
    but the newest ``keep``. Collective: every rank calls it. Returns the checkpoint folder.
    Save after the optimizer has stepped: DCP's ``get_state_dict`` creates the state of an
    optimizer that has none with a zero-gradient step (``lr = 0``), which counts as a step.

    ``extra_state`` must load with ``torch.load(weights_only=True)`` (tensors, numbers, strings,
    containers); rank 0's is written. ``meta`` (JSON-serialisable) goes into ``meta.json``.
    """
    step = int(extra_state["step"] if step is None else step)
    root = Path(root)
    final = step_dir(root, step)
    tmp = root / f".tmp-{final.name}-{_FORMAT}"
    if _rank0():
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)  # collective (ProjectedAdamW's sparse moments)
    tensors, rest = _split_optimizer_state(optimizer_state)
    odd = [key for key, value in model_state.items() if not torch.is_tensor(value)]
    if odd:
        raise ValueError(f"save_sharded_checkpoint: the model's state dict holds non-tensors ({odd[:3]}); they cannot be "
                         "read back with weights_only")
    dcp.save({"model": model_state, "optimizer": tensors}, storage_writer=FileSystemWriter(tmp / "dcp"))
    if _rank0():
        torch.save(rest, tmp / "optimizer_meta.pt")
        torch.save(extra_state, tmp / "trainer_state.pt")
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        checksums = {str(p.relative_to(tmp)): file_sha256(p) for p in files}
        world = dist.get_world_size() if dist.is_initialized() else 1
        record = {**(meta or {}), "format": _FORMAT, "step": step, "world_size": world, "checksums": checksums}
        (tmp / "meta.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
        for path in [*files, tmp / "meta.json"]:
            fsync_file(path)
        publish_checkpoint(tmp, final, keep)
    _barrier()
    return final


# ---------------------------------------------------------------------- load


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """Whether the checkpoint folder ``path`` was written by :func:`save_sharded_checkpoint`."""
    return (Path(path) / "dcp" / ".metadata").is_file()


def _verify(path: Path) -> dict[str, Any]:
    missing = [name for name in SHARDED_FILES if not (path / name).exists()]
    if missing:
        raise UsageError(f"checkpoint {path} is incomplete (missing {', '.join(missing)}); resume from an earlier one")
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (ValueError, OSError) as error:
        raise UsageError(f"checkpoint {path} is corrupt ({first_line(error)}); resume from an earlier one") from None
    for name, digest in (meta.get("checksums") or {}).items():
        if not (path / name).is_file() or file_sha256(path / name) != digest:
            raise UsageError(f"checkpoint {path} is corrupt: {name} does not match the checksum written with it; resume "
                             "from an earlier checkpoint")
    return meta


def load_sharded_checkpoint(
    path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> dict[str, Any]:
    """Load a checkpoint of :func:`save_sharded_checkpoint` into ``model`` (and ``optimizer``), on
    any world size (FSDP2 on any number of ranks, or a plain one-process model), and return its
    ``extra_state``. Collective when a process group exists. Checksums are verified first, and
    nothing is unpickled beyond ``weights_only`` (module docstring). ``optimizer=None`` loads the
    weights alone.

    Build ``model`` (sharded with :func:`lowrank.distributed.fsdp.shard_model` or not) and the
    optimizer exactly as for a fresh run first; an optimizer without state gets its state
    tensors from one zero-gradient step with ``lr = 0`` (DCP's ``get_state_dict`` does that),
    which the loaded state then replaces.
    """
    path = Path(path)
    _verify(path)
    try:
        rest = torch.load(path / "optimizer_meta.pt", weights_only=True)
        extra_state = torch.load(path / "trainer_state.pt", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any decoding failure means a damaged file
        raise UsageError(f"checkpoint {path} is corrupt ({first_line(error)}); resume from an earlier one") from None
    if optimizer is None:
        template: dict[str, Any] = {"model": get_model_state_dict(model)}
    else:
        model_state, optimizer_state = get_state_dict(model, optimizer)
        template = {"model": model_state, "optimizer": _split_optimizer_state(optimizer_state)[0]}
    try:
        dcp.load(template, storage_reader=SafeFileSystemReader(path / "dcp"))
    except Exception as error:  # noqa: BLE001 - DCP reports a mismatch in many ways
        raise UsageError(f"checkpoint {path} does not fit this model or optimizer ({first_line(error)}); resume with the "
                         "model, method and options the run was started with") from None
    if optimizer is None:
        set_model_state_dict(model, template["model"])
        return extra_state
    loaded = template["optimizer"]["state"]
    state = {fqn: {**rest["state"].get(fqn, {}), **tensors} for fqn, tensors in loaded.items()}
    set_state_dict(model, optimizer, model_state_dict=template["model"],
                   optim_state_dict={"state": state, "param_groups": rest["param_groups"]})
    return extra_state


# ---------------------------------------------------------------------- export


def dcp_to_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model's whole state dict (CPU tensors, unsharded, by parameter name) from the files of
    a sharded checkpoint alone: no model, no process group (``no_dist``), restricted unpickling."""
    path = Path(path)
    _verify(path)
    reader = SafeFileSystemReader(path / "dcp")
    metadata = reader.read_metadata()
    template = {}
    for key, entry in metadata.state_dict_metadata.items():
        if key.startswith("model.") and hasattr(entry, "chunks"):
            template[key[len("model."):]] = torch.empty(tuple(entry.size), dtype=entry.properties.dtype)
    dcp.load({"model": template}, storage_reader=SafeFileSystemReader(path / "dcp"), no_dist=True)
    return template


def export_model_weights(path: str | os.PathLike) -> Path:
    """Write ``model.safetensors`` (the whole model, :func:`dcp_to_state_dict`) into the sharded
    checkpoint folder ``path``, atomically, so that ``lowrank export`` (which reads
    ``model.safetensors`` and ``meta.json``) can export it. Returns the file."""
    path = Path(path)
    weights = {name: tensor.contiguous() for name, tensor in dcp_to_state_dict(path).items()}
    target = path / "model.safetensors"
    atomic_write_bytes(target, safetensors_bytes(weights))
    return target
