"""``lowrank memory``: estimate (and optionally measure) the training memory of methods."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..errors import UsageError
from . import report
from ..precision import compute_dtype
from .build import DTYPES, available, load_config, parse_dtype
from .estimate import MemoryEstimate, estimate
from ..cli import pick_device
from .measure import measure_method
from ..cli.memory_options import add_memory_options

__all__ = ["add_arguments", "run_from_args", "DEFAULT_SEQ_LEN"]

DEFAULT_SEQ_LEN = 2048


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--model", required=True, help="bundled model (tiny, llama_60m ... llama_7b) or a Hugging Face config JSON")
    add("--method", default="all",
        help=f"comma-separated methods, or 'all' ({', '.join(available())}); preset YAML paths work too")
    add_memory_options(parser, batch_size=1, seq_len=None, param_dtype="fp32", older_spellings=True,
                       seq_len_help="tokens per sequence (default: 2048, or the model's max_position_embeddings if smaller)")
    add("--state-dtype", default="float32", choices=sorted(DTYPES),
        help="Adam moments (ProjectedAdamW's state_dtype; full_rank switches to ProjectedAdamW when it differs "
             "from --param-dtype, since torch's AdamW keeps moments in the weight dtype)")
    add("--fsdp2", type=int, default=1, metavar="RANKS", help="per-rank bytes under --strategy fsdp2 with this many ranks")
    add("--measure", type=int, default=0, metavar="STEPS", help="also run STEPS real training steps per method and compare")
    add("--device", default="auto", choices=["auto", "cpu", "cuda"], help="device for --measure")
    add("--json", nargs="?", const="-", default=None, metavar="PATH",
        help="JSON instead of the table on stdout, or (with PATH) written there as well")
    add("--plot", default=None, metavar="PNG", help="stacked bar chart per method: a .png file, or a folder to write memory_<model>.png into")


# "all" lists the methods by family: dense baselines, cheaper moments, projected gradients,
# low-rank weights; presets added later follow alphabetically.
_FAMILY_ORDER = ("full_rank", "adamw8bit", "spam", "stable_spam", "galore", "fira", "apollo",
                 "low_rank", "low_rank_restarts", "lowrank_sparse", "relora", "sltrain")


def _methods(value: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    if not names:
        raise UsageError("--method is empty; name one or more methods, e.g. --method full_rank,galore")
    if names == ["all"]:
        return sorted(available(), key=lambda name: (_FAMILY_ORDER.index(name) if name in _FAMILY_ORDER else len(_FAMILY_ORDER), name))
    return list(dict.fromkeys(names))


def _model_info(config, name: str, e: MemoryEstimate) -> dict[str, Any]:
    keys = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "vocab_size")
    return {"name": name, **{key: getattr(config, key, None) for key in keys}, "parameters": e.parameters}


def run_from_args(args: argparse.Namespace) -> dict[str, Any]:
    for name in ("batch_size", "seq_len"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.rank is not None and args.rank <= 0:
        raise UsageError(f"--rank must be positive, got {args.rank}")
    if args.measure < 0:
        raise UsageError(f"--measure must be >= 0 steps, got {args.measure}")
    methods = _methods(args.method)
    config, name = load_config(args.model)
    limit = getattr(config, "max_position_embeddings", None)
    if args.seq_len is None:
        args.seq_len = min(DEFAULT_SEQ_LEN, limit or DEFAULT_SEQ_LEN)
    elif limit is not None and args.seq_len > limit:
        raise UsageError(f"--seq-len {args.seq_len} exceeds {name}'s max_position_embeddings ({limit}); lower --seq-len")
    options = dict(rank=args.rank, weight_dtype=args.param_dtype, state_dtype=args.state_dtype,
                   batch_size=args.batch_size, seq_len=args.seq_len, checkpointing=args.activation_checkpointing,
                   layerwise=args.layerwise_step)
    if args.fsdp2 < 1:
        raise UsageError(f"--fsdp2 must be a positive number of ranks, got {args.fsdp2}")
    if args.fsdp2 > 1 and args.measure:
        raise UsageError("--measure runs one process; drop it with --fsdp2 (the FSDP2 numbers are estimates)")
    plot_path = _plot_path(args.plot, name) if args.plot else None
    start = time.perf_counter()
    # The table is a GPU's view: compute in the storage dtype, plain Adam batched by foreach kernels.
    options_gpu = dict(options, world_size=args.fsdp2, device="cuda")
    estimates = [estimate(args.model, method, **options_gpu) for method in methods]
    by_name = {e.method: e for e in estimates}
    baseline = by_name.get(report.BASELINE) or estimate(args.model, report.BASELINE, **options_gpu)
    seconds = time.perf_counter() - start

    pairs = []
    if args.measure:
        device = pick_device(args.device).type
        _check_fits(estimates, device)
        # Compared with the estimate for the measuring device's compute dtype (a CPU computes in fp32 from bf16).
        compute, _ = compute_dtype(torch.device(device), parse_dtype(args.param_dtype, "--param-dtype"), "auto")
        for method in methods:
            e = estimate(args.model, method, **options, world_size=args.fsdp2, compute_dtype=compute, device=device)
            pairs.append((e, measure_method(args.model, method, steps=args.measure, device=device, **options)))

    data = report.to_json(estimates, baseline, model_info=_model_info(config, name, baseline),
                          requested_rank=args.rank, measurements=pairs)
    if args.json == "-":
        sys.stdout.write(report.dumps(data))
    else:
        print(report.format_table(estimates, baseline))
        print(f"({len(estimates)} estimate(s) in {seconds:.2f} s)")
        if pairs:
            print()
            print(report.format_comparison(pairs))
        if args.json:
            try:
                with open(args.json, "w") as handle:
                    handle.write(report.dumps(data))
            except OSError as error:
                raise UsageError(f"--json {args.json}: cannot write ({error.strerror})") from None
    if plot_path is not None:
        try:
            report.plot(estimates, baseline, plot_path)
        except (OSError, ValueError) as error:
            raise UsageError(f"--plot {args.plot}: cannot write the PNG ({error})") from None
    return data


def _plot_path(value: str, model: str) -> Path:
    """``--plot``: a ``.png`` path, or an existing folder (the file goes inside it)."""
    path = Path(value)
    if path.is_dir() or value.endswith(("/", os.sep)):
        return path / f"memory_{model}.png"
    if path.suffix.lower() != ".png":
        raise UsageError(f"--plot {value}: give a .png file name or an existing folder")
    return path


def _available_bytes(device: str) -> int | None:
    """Free memory where ``--measure`` would run: CUDA's free bytes, or the system's MemAvailable."""
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _check_fits(estimates: list[MemoryEstimate], device: str) -> None:
    """Refuse ``--measure`` when the largest estimate does not fit in free memory (it would swap or
    run for minutes before failing)."""
    available = _available_bytes(device)
    largest = max(estimates, key=lambda e: e.total)
    if available is not None and largest.total > available:
        raise UsageError(
            f"--measure: {largest.method} needs about {largest.total / 2**30:.1f} GiB (estimated) but {device} has "
            f"{available / 2**30:.1f} GiB free; lower --seq-len / --batch-size or drop --measure"
        )
