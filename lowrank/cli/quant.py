"""``lowrank quant-eval`` and ``lowrank quantize``: command-line functions over
:mod:`lowrank.quant.evaluate` and :mod:`lowrank.quant.ptq`.

Both take ``RUN_OR_EXPORTED_DIR``: a ``lowrank pretrain`` run folder (or one of its
``checkpoints/step_N``), whose model is rebuilt by :func:`lowrank.integrations.export.load_run_model`,
merged to dense when it was wrapped and OSP-folded when it is an OSP model; or a plain Hugging
Face model folder (``lowrank export`` output, any ``save_pretrained`` folder), loaded with
``AutoModelForCausalLM.from_pretrained``. The tokenizer is the run's (``tokenizer/`` or its
``--tokenizer``) or the folder's own, unless ``--tokenizer`` is given; the corpus ``--data`` takes
every form ``lowrank pretrain --data`` does (``builtin``, a local file or folder, a hub id) and is
tokenized with that tokenizer (:func:`lowrank.data.build_data`): its validation split is what
``quant-eval`` measures, its training split what ``quantize`` calibrates on.

User errors are :class:`~lowrank.errors.UsageError` (one line, exit code 2 from ``lowrank``).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UsageError
from . import pick_device
from ..run.config import check_writable_file, check_writable_folder

__all__ = [
    "load_model_for_quant",
    "add_quant_eval_arguments",
    "run_quant_eval",
    "add_quantize_arguments",
    "run_quantize",
]

_DEFAULT_SEQ_LEN = 256


def _is_hf_folder(path: Path) -> bool:
    """A ``save_pretrained`` folder: ``config.json`` naming a ``model_type``, and not a run folder."""
    if (path / "meta.json").is_file() or (path / "checkpoints").is_dir():
        return False
    try:
        return "model_type" in json.loads((path / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def load_model_for_quant(path: str, *, tokenizer: str | None = None, device: str = "cpu") -> tuple[nn.Module, Any, dict]:
    """``(plain model in eval mode, tokenizer, info)`` for ``RUN_OR_EXPORTED_DIR`` (module docstring).

    ``info``: ``{"source": "run" | "hf", "path", "tokenizer", "seq_len" (the run's, or None)}``.
    Raises :class:`UsageError` for a missing folder, a run folder without a checkpoint, or a
    tokenizer whose vocabulary does not match the embedding."""
    from ..data import load_tokenizer
    from ..deploy import plain_model

    folder = Path(path)
    if folder.is_dir() and _is_hf_folder(folder):
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
        except (OSError, ValueError) as error:
            raise UsageError(f"{folder}: cannot load it as a Hugging Face model ({str(error).splitlines()[0]})") from None
        tokenizer_source, seq_len = tokenizer or str(folder), None
        source = "hf"
    else:
        from ..integrations.export import _run_tokenizer, find_checkpoint, load_run_model

        checkpoint = find_checkpoint(folder)
        model, meta = load_run_model(checkpoint)
        tokenizer_source = tokenizer or _run_tokenizer(checkpoint, meta)
        seq_len = (meta.get("config") or {}).get("seq_len")
        source = "run"
    tok = load_tokenizer(tokenizer_source)
    vocab, rows = len(tok), model.get_input_embeddings().num_embeddings
    if vocab != rows:
        raise UsageError(f"tokenizer {tokenizer_source}: {vocab} tokens for an embedding of {rows} rows; pass the model's own with --tokenizer")
    model = plain_model(model, inplace=True).to(pick_device(device)).eval()  # just loaded: nothing else holds it
    return model, tok, {"source": source, "path": str(folder), "tokenizer": str(tokenizer_source), "seq_len": seq_len}


def _common_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("model", metavar="RUN_OR_EXPORTED_DIR",
        help="a `lowrank pretrain` run folder (or checkpoints/step_N), or a Hugging Face model folder (`lowrank export` output)")
    add("--data", required=True, help="corpus: 'builtin', a .txt/.txt.gz/.jsonl/.parquet file or folder, or a hub dataset 'owner/name[:config]'")
    add("--tokenizer", default=None, help="tokenizer folder or hub name (default: the run's, or the model folder's)")
    add("--seq-len", type=int, default=None, help=f"tokens per sequence (default: the run's, else {_DEFAULT_SEQ_LEN})")
    add("--batch-size", type=int, default=8, help="sequences per forward")
    add("--group-size", type=int, default=128, help="input channels per weight-quantization group (must divide every layer's)")
    add("--flat-groups", action="store_true", help="groups of consecutive entries of the flattened weight (may span rows): "
                                                   "for widths the group size does not divide")
    add("--cache-dir", default=None, help="cache for the tokenized corpus (default: none)")
    add("--device", default="auto", choices=["auto", "cpu", "cuda"])
    add("--json", default=None, metavar="FILE", help="also write the result as JSON here")


def _positive(value: Any, option: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"{option} must be a positive integer, got {value!r}")
    return value


def _seq_len(args: argparse.Namespace, model: nn.Module, info: dict) -> int:
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    seq_len = args.seq_len or info["seq_len"] or min(_DEFAULT_SEQ_LEN, limit or _DEFAULT_SEQ_LEN)
    _positive(seq_len, "--seq-len")
    if limit and seq_len > limit:
        raise UsageError(f"--seq-len {seq_len} exceeds the model's max_position_embeddings ({limit})")
    return seq_len


def _check_group_size(model: nn.Module, group_size: int, flat: bool) -> None:
    """``--group-size`` splits every quantized layer's weight into whole groups (the linear layers
    but the output head, :mod:`lowrank.quant.evaluate`), said in terms of the flags, before any data work."""
    head = model.get_output_embeddings()
    shapes = {name: m.weight.shape for name, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head}
    sizes = {name: (shape.numel() if flat else shape[-1]) for name, shape in shapes.items()}
    bad = next((name for name, size in sizes.items() if size % group_size), None)
    if bad is not None:
        fits = math.gcd(*sizes.values())
        unit = "entries" if flat else "input channels"
        hint = "" if flat else ", or --flat-groups (groups of the flattened weight, which may span rows)"
        raise UsageError(f"--group-size {group_size} does not divide the {sizes[bad]} {unit} of {bad}; use a divisor of "
                         f"{fits} (e.g. --group-size {fits}){hint}")


def _check_json(path: str | None) -> None:
    """``--json`` can be written: checked before the evaluation, not after it."""
    if path:
        check_writable_file(Path(path), "--json")


def _write_json(path: str | None, result: dict) -> None:
    if path:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(result, indent=1) + "\n")


def _load_data(args: argparse.Namespace, tokenizer_source: str, seq_len: int, valid_tokens: int):
    from ..data import build_data

    return build_data(args.data, seq_len=seq_len, batch_size=args.batch_size, tokenizer=tokenizer_source,
                      cache_dir=args.cache_dir, max_valid_tokens=max(valid_tokens, seq_len))


# ---------------------------------------------------------------------- quant-eval


def add_quant_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``lowrank quant-eval RUN_OR_EXPORTED_DIR --data CORPUS [...]``."""
    _common_arguments(parser)
    from ..quant.evaluate import KURTOSIS_PROTOCOLS

    parser.add_argument("--eval-tokens", type=int, default=65_536, help="validation tokens (spread over the validation split)")
    parser.add_argument("--kurtosis-protocol", default=KURTOSIS_PROTOCOLS[0], choices=list(KURTOSIS_PROTOCOLS),
                        help="ours: decoder layer outputs, full context; osp: OSP's evaluate_kurtosis.py (each token alone, "
                             "embedding output + layers 1..L-1 + final-normed last state)")


def run_quant_eval(args: argparse.Namespace) -> dict:
    """Hidden-state kurtosis and perplexity in full precision and under w4/w3/w2/w4a4/w8a8
    (:func:`lowrank.quant.evaluate.evaluate_quantization`); prints a table, writes ``--json``."""
    from ..quant.evaluate import evaluate_quantization, format_quant_eval

    for option in ("batch_size", "group_size", "eval_tokens"):
        _positive(getattr(args, option), f"--{option.replace('_', '-')}")
    _check_json(args.json)
    model, _, info = load_model_for_quant(args.model, tokenizer=args.tokenizer, device=args.device)
    _check_group_size(model, args.group_size, args.flat_groups)
    seq_len = _seq_len(args, model, info)
    data = _load_data(args, info["tokenizer"], seq_len, args.eval_tokens)
    result = evaluate_quantization(model, data.valid, batch_size=args.batch_size, group_size=args.group_size,
                                   flat=args.flat_groups, kurtosis_protocol=args.kurtosis_protocol)
    result = {"model": info, "data": args.data, **result}
    print(format_quant_eval(result))
    _write_json(args.json, result)
    return result


# ---------------------------------------------------------------------- quantize


def add_quantize_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``lowrank quantize RUN_OR_EXPORTED_DIR --bits B --data CORPUS --out DIR [...]``."""
    from ..quant.clipping import CLIPPINGS
    from ..quant.ptq import METHODS, RECIPES, SALIENCY

    _common_arguments(parser)
    parser.set_defaults(group_size=None)  # quantize: the recipe's group size for --bits
    add = parser.add_argument
    add("--bits", type=int, required=True, help="weight bits: 2, 3, 4 or 8")
    add("--out", required=True, help="folder to write the quantized model to (dense Hugging Face model + quantize.json)")
    add("--method", default=METHODS[0], help=f"{', '.join(METHODS)} (default {METHODS[0]})")
    add("--recipe", default=next(iter(RECIPES)), choices=list(RECIPES),
        help="named settings every option below defaults to: ours, or apiq (ApiQ's released 2-bit script: 20 epochs x 128 "
             "samples, lr 5e-4 wd 0.1, LoRA scale 0.25, group 64 at 2 bits, MSE); lowrank.quant.recipes lists them")
    add("--rank", type=int, default=64, help="rank of the low-rank factors")
    add("--calib-tokens", type=int, default=None, help="calibration tokens from the training split (default: the recipe's)")
    add("--calib-batch-size", type=int, default=None, help="calibration sequences per retraining step (default: the recipe's)")
    add("--steps", type=int, default=None, help="retraining steps per decoder block (default: the recipe's; 0: initialisation only)")
    add("--epochs", type=int, default=None, help="retraining epochs over the calibration batches, instead of --steps")
    add("--lr", type=float, default=None, help="retraining learning rate of the factors (default: the recipe's)")
    add("--clipping", default=None, choices=list(CLIPPINGS), help="learned (ApiQ's per-group clipping) or frozen RTN codes")
    add("--saliency-lambda", type=float, default=None, help="weight of the saliency-aware regularizer (default: the recipe's)")
    add("--saliency", default=None, choices=list(SALIENCY),
        help="fisher (published: g²·(Q(W)−W)² in the first weight-preservation steps; default), or ours on Q+sBA at every "
             "step with |W|·‖X_j‖ (activation) or |W·∂L/∂W| (gradient)")
    add("--symmetric", action="store_true", help="symmetric absmax grid instead of min-max with a zero point")
    add("--eval-tokens", type=int, default=32_768, help="validation tokens to compare full precision and quantized (0: skip)")
    add("--peft", action="store_true", help="also write a PEFT LoRA adapter over the dequantized base (DIR/peft/)")
    add("--overwrite", action="store_true", help="replace --out if it exists and is not empty")
    add("--seed", type=int, default=0)


def run_quantize(args: argparse.Namespace) -> dict:
    """Quantize (:func:`lowrank.quant.ptq.quantize`), export (:func:`lowrank.quant.ptq.export_quantized`),
    and print the calibration and validation losses; writes ``--json``."""
    from ..quant.evaluate import validation_loss
    from ..quant.ptq import RECIPES, export_quantized, quantize
    from ..quant.formats import INT_BITS

    if isinstance(args.bits, bool) or args.bits not in INT_BITS:
        raise UsageError(f"--bits must be one of {', '.join(map(str, INT_BITS))}, got {args.bits!r}")
    calib_tokens = RECIPES[args.recipe].calib_tokens if args.calib_tokens is None else args.calib_tokens
    for option, value in (("batch_size", args.batch_size), ("group_size", args.group_size), ("calib_tokens", calib_tokens),
                          ("calib_batch_size", args.calib_batch_size)):
        if value is not None:
            _positive(value, f"--{option.replace('_', '-')}")
    out = Path(args.out)
    if out.exists() and not args.overwrite and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--out {out} exists and is not empty; pick a new folder, or pass --overwrite to replace it")
    check_writable_folder(out, "--out")
    _check_json(args.json)
    model, tok, info = load_model_for_quant(args.model, tokenizer=args.tokenizer, device=args.device)
    seq_len = _seq_len(args, model, info)
    data = _load_data(args, info["tokenizer"], seq_len, args.eval_tokens or seq_len)
    count = math.ceil(calib_tokens / (args.batch_size * seq_len))
    calibration = torch.cat([next(data.train) for _ in range(count)])
    quantized, report = quantize(
        model, calibration, bits=args.bits, recipe=args.recipe, group_size=args.group_size, flat=args.flat_groups, rank=args.rank,
        method=args.method, steps=args.steps, epochs=args.epochs, lr=args.lr, reg_lambda=args.saliency_lambda, saliency=args.saliency,
        clipping=args.clipping, symmetric=args.symmetric, batch_size=args.calib_batch_size, seed=args.seed,
    )
    if args.eval_tokens:
        valid = [b.to(next(model.parameters()).device) for b in data.valid.split(args.batch_size)]
        full, low = validation_loss(model, valid), validation_loss(quantized, valid)
        report["validation"] = {"tokens": int(data.valid.numel()), "fp_loss": full, "fp_ppl": math.exp(full),
                                "loss": low, "ppl": math.exp(low)}
    report = {"model": info, "data": args.data, **report}
    report["export"] = export_quantized(quantized, out, tokenizer=tok, report=report, peft=args.peft, overwrite=args.overwrite)
    calib = report["calibration_loss"]
    print(f"quantized {report['layers_quantized']} layers of {info['path']} to {report['format']} "
          f"(rank {report['rank']}, {report['bits_per_weight']['base']:.3f} bits/weight + factors) with {report['method']} ({report['recipe']} recipe): "
          f"calibration loss {calib['full_precision']:.4f} (full precision) -> {calib['quantized']:.4f}")
    if report["blocks"]:
        initial = sum(b["initial"] for b in report["blocks"]) / len(report["blocks"])
        final = sum(b["final"] for b in report["blocks"]) / len(report["blocks"])
        print(f"block output error, mean over {len(report['blocks'])} blocks: {initial:.4f} after ApiQ init -> {final:.4f} retrained")
    if "validation" in report:
        v = report["validation"]
        print(f"validation ppl: full precision {v['fp_ppl']:.2f}, quantized {v['ppl']:.2f} ({v['tokens']:,} tokens)")
    print(f"wrote {out}" + (" (+ peft/base, peft/adapter)" if args.peft else ""))
    _write_json(args.json, report)
    return report
