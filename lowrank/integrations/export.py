"""``lowrank export RUN_DIR --out DIR``: a trained run → a plain dense Hugging Face model.

``DIR`` holds ``model.safetensors``, ``config.json``, ``generation_config.json`` and the
tokenizer, and nothing of ``lowrank``: ``AutoModelForCausalLM.from_pretrained(DIR)`` loads it in
a Python where ``lowrank`` is not installed, and its logits are those of the trained low-rank
model, because every ``LowRankLinear`` becomes the ``nn.Linear`` holding ``W0 + s·BA + S``
(:func:`lowrank.merge_to_dense`).

Steps: find the checkpoint (a run folder's latest, or the ``step_N`` folder given) → rebuild the
model from its ``meta.json`` (the Hugging Face config, then the method's wrapping when the
checkpoint was wrapped) → load ``model.safetensors``, every key accounted for → merge to dense →
check the tokenizer against the embedding → write into a temporary folder, renamed into place.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..dtypes import DTYPES, dtype_name
from ..errors import UsageError
from ..run.checkpoint import resolve_checkpoint
from ..run.config import check_writable_folder
from ..run.folder import CheckpointMeta, RunFolder

__all__ = ["export_model", "load_run_model", "find_checkpoint", "add_arguments", "run_from_args"]

_NEEDED = ("model.safetensors", "meta.json")


def find_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint folder for ``path``: a checkpoint (``step_N``) folder itself, or a run
    folder (or its ``checkpoints`` folder), whose latest checkpoint is used."""
    path = Path(path)
    if not path.is_dir():
        what = "a file, not a folder" if path.exists() else "no such folder"
        raise UsageError(f"{path}: {what}; pass a run folder (lowrank pretrain --out) or one of its checkpoints/step_N folders")
    if (path / "trainer_state.json").is_file() and not (path / "meta.json").is_file():
        raise UsageError(
            f"{path} is a transformers Trainer checkpoint, not a `lowrank pretrain` one; in Python, load the wrapped "
            "model and save lowrank.merge_to_dense(model) with save_pretrained"
        )
    if any((path / name).is_file() for name in _NEEDED) or (path / "dcp").is_dir():
        checkpoint = path
    else:
        try:
            checkpoint = resolve_checkpoint(str(path), path)
        except UsageError:
            raise UsageError(
                f"{path} holds no checkpoint (expected checkpoints/step_N/ with {' and '.join(_NEEDED)}); "
                "pass the --out folder of a `lowrank pretrain` run that saved at least one checkpoint"
            ) from None
    needed = ("meta.json",) if (checkpoint / "dcp").is_dir() else _NEEDED  # an FSDP2 (DCP) checkpoint
    missing = [name for name in needed if not (checkpoint / name).is_file()]
    if missing:
        raise UsageError(f"checkpoint {checkpoint} is incomplete (missing {', '.join(missing)}); export an earlier checkpoint")
    return checkpoint


def load_run_model(path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """The trained model of a run (its latest checkpoint) or of a checkpoint folder, as it was
    trained (wrapped when it was), in eval mode; and the checkpoint's ``meta.json``."""
    from transformers import AutoConfig

    from ..errors import first_line
    from ..methods import Method, apply_method
    from ..models import build_model, check_model_shape
    from ..precision import param_dtype, store_parameters
    from ..run.checkpoint import load_weights

    checkpoint = find_checkpoint(path)
    meta = CheckpointMeta.read(checkpoint)
    config_dict = dict(meta.model_config)
    # the sizes first, on the dict: transformers' own validation error is a multi-line traceback type
    check_model_shape(config_dict, f"checkpoint {checkpoint}: meta.json's model_config")
    try:
        config = AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
    except (ValueError, TypeError, KeyError) as error:
        raise UsageError(f"checkpoint {checkpoint}: meta.json's model_config is not a transformers config "
                         f"({first_line(error)})") from None
    check_model_shape(config, f"checkpoint {checkpoint}: meta.json's model_config")
    model = build_model(config)
    # The method as the run resolved it (overrides applied), so the layers get the very shapes
    # (rank, base, sparse support, OSP projections) that were trained; not wrapped during a warm start.
    method = Method.from_dict(str(meta.method.get("name", "method")), meta.method, f"checkpoint {checkpoint}: meta.json")
    apply_method(model, method, seed=int(meta.config.get("seed", 0)), lowrank=meta.wrapped)
    # A bf16 run's weights load into bf16 parameters: exactly what was trained, and exported as bf16.
    store_parameters(model, param_dtype(meta.config.get("param_dtype") or method.training.param_dtype))
    weights = None
    if (checkpoint / "dcp").is_dir():
        from ..distributed.dcp import dcp_to_state_dict

        weights = dcp_to_state_dict(checkpoint)
    load_weights(checkpoint, model, weights=weights)
    return model.eval(), meta.to_dict()


def _run_tokenizer(checkpoint: Path, meta: dict[str, Any]) -> str:
    """The tokenizer the run trained with: the run folder's (saved by ``lowrank pretrain``),
    else the ``--tokenizer`` the run was given."""
    folder = RunFolder.of_checkpoint(checkpoint)
    if folder.tokenizer.is_dir():
        return str(folder.tokenizer)
    given = (meta.get("config") or {}).get("tokenizer")
    if given:
        return given
    raise UsageError(f"no tokenizer in {folder.tokenizer}; pass the one the run was trained with: --tokenizer PATH")


def export_model(
    run_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    tokenizer: str | None = None,
    overwrite: bool = False,
    dtype: str | None = None,
) -> dict[str, Any]:
    """Write the run's model as a dense Hugging Face model folder ``out`` (see the module docstring).

    Args:
        run_dir: a run folder (its latest checkpoint is exported) or a ``checkpoints/step_N`` folder.
        out: the folder to write; it must not exist or be empty, unless ``overwrite``.
        tokenizer: a tokenizer folder / ``tokenizer.json`` / hub name; default: the run's.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``; default: the trained weights' dtype.

    Returns:
        ``{"out", "checkpoint", "step", "parameters", "dtype", "tokenizer"}``.

    Raises:
        UsageError: no checkpoint, an incomplete or damaged one, ``out`` not empty, or a tokenizer
            whose vocabulary does not match the model's embedding.
    """
    from ..data import load_tokenizer
    from ..deploy import plain_model

    checkpoint = find_checkpoint(run_dir)
    out = Path(out)
    resolved = out.resolve()
    if resolved == checkpoint.resolve() or resolved in checkpoint.resolve().parents:
        raise UsageError(f"--out {out} would replace the run being exported; pick a new folder")
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--out {out} exists and is not empty; pick a new folder, or pass --overwrite to replace it")
    check_writable_folder(out.parent, "--out's folder")  # where the model is written, then renamed to --out
    if dtype is not None and dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")

    model, meta = load_run_model(checkpoint)
    tokenizer = tokenizer or _run_tokenizer(checkpoint, meta)
    tok = load_tokenizer(tokenizer)
    rows = model.get_input_embeddings().num_embeddings
    if len(tok) != rows:
        raise UsageError(
            f"tokenizer {tokenizer} has {len(tok)} tokens but the model's embedding has {rows} rows: it is not the "
            "tokenizer this model was trained with; pass that one with --tokenizer"
        )
    dense = plain_model(model, inplace=True)
    if dtype is not None:
        dense.to(DTYPES[dtype])
    # The config came from meta.json, i.e. from transformers itself; make sure that nothing of
    # ours ever reaches config.json, which a Python without lowrank will read.
    for key in [k for k in dense.config.to_dict() if "lowrank" in k.lower()]:
        delattr(dense.config, key)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    dense.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    os.rename(tmp, out)
    return {
        "out": str(out),
        "checkpoint": str(checkpoint),
        "step": meta.get("step"),
        "parameters": sum(p.numel() for p in dense.parameters()),
        "dtype": dtype_name(next(dense.parameters()).dtype),
        "tokenizer": tokenizer,
    }


# ---------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("run_dir", help="a `lowrank pretrain` run folder (its latest checkpoint) or a checkpoints/step_N folder")
    add("--out", required=True, help="folder to write the dense Hugging Face model to")
    add("--tokenizer", default=None, help="tokenizer to save with the model (default: the run's tokenizer/ folder)")
    add("--dtype", default=None, choices=sorted(DTYPES), help="cast the weights (default: as trained)")
    add("--overwrite", action="store_true", help="replace --out if it exists and is not empty")


def run_from_args(args: argparse.Namespace) -> dict[str, Any]:
    summary = export_model(args.run_dir, args.out, tokenizer=args.tokenizer, overwrite=args.overwrite, dtype=args.dtype)
    print(
        f"exported step {summary['step']} of {summary['checkpoint']} to {summary['out']}: "
        f"{summary['parameters']:,} parameters ({summary['dtype']}), tokenizer {summary['tokenizer']}"
    )
    return summary
