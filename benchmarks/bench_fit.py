"""What fits: the memory estimate beside real training steps of the trainer, per storage option.

    python benchmarks/bench_fit.py [--models llama_350m,llama_1b] [--seq-len 256] [--readme README.md]

For each model, method and option set (fp32; bf16 storage; bf16 storage + activation
checkpointing) one fresh process builds the model and optimizer as ``lowrank pretrain`` does and
runs ``--steps`` steps through the trainer's own preparation and optimizer step
(:mod:`lowrank.run.step`: bf16 storage computing in fp32 on a CPU, stepped parameter by parameter
with stochastic rounding; checkpointed decoder layers): :func:`lowrank.memory.measure_method`.
Recorded: the estimate (for this CPU's compute dtype, and for a GPU's), the measured weights,
gradients, optimizer state and saved activations, and the peak — the torch profiler's CPU
allocator peak (the analogue of CUDA's ``max_memory_allocated``) and the process's peak RSS.

Resumable: ``benchmarks/results/fit.json`` keeps every finished row, and a row whose settings are
unchanged is not run again. ``--readme`` renders the "What fits" block from the file.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, comma_names, machine_info, replace_readme_block  # noqa: E402

NAME = "fit"
METHODS = ("full_rank", "galore", "low_rank_restarts", "lowrank_sparse_8bit")
RANKS = {"llama_350m": 256, "llama_1b": 512, "llama_7b": 1024}  # the memory table's r/d
OPTIONS = {  # label: (param dtype, activation checkpointing)
    "fp32": ("float32", False),
    "bf16": ("bfloat16", False),
    "bf16+ckpt": ("bfloat16", True),
}
BLOCK = ("<!-- fit-table -->", "<!-- /fit-table -->")
GIB = 2**30


def row_settings(model: str, method: str, option: str, seq_len: int, batch_size: int, steps: int, device: str) -> dict:
    weight_dtype, checkpointing = OPTIONS[option]
    return {"model": model, "method": method, "option": option, "rank": RANKS[model], "weight_dtype": weight_dtype,
            "checkpointing": checkpointing, "seq_len": seq_len, "batch_size": batch_size, "steps": steps, "device": device}


def measure_row(settings: dict) -> dict:
    """One row, in this process (the parent runs each row in a fresh one)."""
    import torch

    from lowrank.dtypes import parse_dtype
    from lowrank.memory import estimate
    from lowrank.memory.measure import measure_method
    from lowrank.precision import compute_dtype

    torch.set_num_threads(1)
    device = torch.device(settings["device"])
    options = dict(rank=settings["rank"], weight_dtype=settings["weight_dtype"], state_dtype="float32",
                   batch_size=settings["batch_size"], seq_len=settings["seq_len"], checkpointing=settings["checkpointing"])
    # The estimate for the measuring device's compute dtype (fp32 from bf16 storage on a CPU), and a GPU's (bf16).
    compute, _ = compute_dtype(device, parse_dtype(settings["weight_dtype"], "weight_dtype"), "auto")
    cpu = estimate(settings["model"], settings["method"], compute_dtype=compute, **options)
    gpu = estimate(settings["model"], settings["method"], **options)
    measured = measure_method(settings["model"], settings["method"], steps=settings["steps"], device=device, **options)
    return {
        "settings": settings,
        "estimate_cpu": {k: getattr(cpu, k) for k in ("weights", "gradients", "optimizer_state", "optimizer_extra",
                                                     "activations", "total")} | {"saved": cpu.activation_detail["saved"]},
        "estimate_gpu": {k: getattr(gpu, k) for k in ("weights", "gradients", "optimizer_state", "optimizer_extra",
                                                     "activations", "total")},
        "measured": {k: getattr(measured, k) for k in ("weights", "gradients", "optimizer_state", "optimizer_extra",
                                                      "activations", "peak", "peak_optimizer_step", "peak_forward_backward",
                                                      "peak_rss", "seconds_per_step")},
    }


def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def render(data: dict) -> str:
    """The README block: per model and method, estimate vs measured peak for each option."""
    rows = data.get("rows", {})
    if not rows:
        return "No rows yet: run `python benchmarks/bench_fit.py`."
    first = next(iter(rows.values()))["settings"]
    lines = [
        f"Two real steps of the trainer's step per row ({data['machine']['cpu']}, 1 thread; a GPU row: its device), batch "
        f"{first['batch_size']} × {first['seq_len']} tokens, the memory table's ranks; from "
        "`benchmarks/results/fit.json` (`python benchmarks/bench_fit.py`). *Estimate*: `lowrank memory` for this "
        "CPU's compute dtype (fp32 activations from bf16 storage); *measured peak*: the torch profiler's peak of CPU "
        "allocations during the last step (the analogue of CUDA's `max_memory_allocated`); *GPU estimate*: the same "
        "run computing in bf16.",
        "",
        "| device | model | method | storage | estimate GiB | measured peak GiB | difference | weights+grads+state measured = estimated | GPU estimate GiB |",
        "|---|---|---|---|---:|---:|---:|:---:|---:|",
    ]
    for key, row in rows.items():
        s, e, m = row["settings"], row["estimate_cpu"], row["measured"]
        exact = all(m[k] == e[k] for k in ("weights", "gradients", "optimizer_state", "optimizer_extra"))
        peak = m["peak"]
        diff = f"{(peak - e['total']) / e['total']:+.1%}" if peak else "-"
        lines.append(f"| {s['device']} | {s['model']} | `{s['method']}` | {s['option']} | {e['total'] / GIB:.2f} | "
                     f"{peak / GIB:.2f} | {diff} | {'yes' if exact else 'no'} | {row['estimate_gpu']['total'] / GIB:.2f} |"
                     if peak else f"| {s['device']} | {s['model']} | `{s['method']}` | {s['option']} | {e['total'] / GIB:.2f} | - | - | "
                     f"{'yes' if exact else 'no'} | {row['estimate_gpu']['total'] / GIB:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=comma_names, default=["llama_350m", "llama_1b"])
    parser.add_argument("--methods", type=comma_names, default=list(METHODS))
    parser.add_argument("--options", type=comma_names, default=list(OPTIONS))
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: CUDA's max_memory_allocated peak")
    parser.add_argument("--out-dir", default=str(RESULTS))
    parser.add_argument("--readme", default=None, help="render the README's 'What fits' block from the results")
    parser.add_argument("--row", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row:
        print(json.dumps(measure_row(json.loads(args.row))))
        return
    path = Path(args.out_dir) / f"{NAME}.json"
    data = load(path)
    rows = data.setdefault("rows", {})
    for model in args.models:
        for method in args.methods:
            for option in args.options:
                settings = row_settings(model, method, option, args.seq_len, args.batch_size, args.steps, args.device)
                key = f"{args.device}/{model}/{method}/{option}"
                if key in rows and rows[key]["settings"] == settings:
                    continue
                print(f"{key} ...", flush=True)
                done = subprocess.run([sys.executable, __file__, "--row", json.dumps(settings)], capture_output=True, text=True)
                if done.returncode != 0:
                    print(done.stderr[-2000:], file=sys.stderr)
                    continue
                rows[key] = json.loads(done.stdout.strip().splitlines()[-1])
                data.update(benchmark=NAME, machine=machine_info())
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(data, indent=2) + "\n")
                m = rows[key]["measured"]
                print(f"  peak {m['peak'] / GIB if m['peak'] else float('nan'):.2f} GiB, estimate "
                      f"{rows[key]['estimate_cpu']['total'] / GIB:.2f} GiB, {m['seconds_per_step']:.0f} s/step", flush=True)
    if args.readme:
        replace_readme_block(args.readme, *BLOCK, render(load(path)))


if __name__ == "__main__":
    main()
