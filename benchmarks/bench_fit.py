"""What fits: the memory estimate beside real training steps of the trainer, per storage option.

    python benchmarks/bench_fit.py [--models llama_350m,llama_1b] [--seq-len 256] [--readme README.md]
    python benchmarks/bench_fit.py --models llama_7b --methods lowrank_sparse_8bit --options bf16+ckpt+layerwise
    python benchmarks/bench_fit.py --render --readme README.md      # only re-render the README block
    python benchmarks/bench_fit.py --re-estimate --readme README.md # the recorded rows' estimates from today's estimator

For each model, method and option set (fp32; bf16 storage; bf16 storage + activation
checkpointing; the same with the optimizer step inside backward) one fresh process builds the
model and optimizer as ``lowrank pretrain`` does and runs ``--steps`` steps through the trainer's
own preparation and optimizer step (:mod:`lowrank.run.step`: bf16 storage computing in fp32 on a
CPU, stepped parameter by parameter with stochastic rounding; checkpointed decoder layers;
``--layerwise-step``'s :class:`lowrank.run.layerwise.LayerwiseStep`): :func:`lowrank.memory.measure_method`.
The models of ``LARGE`` (llama_7b) run only the methods and options named by ``--methods`` and
``--options``: each of their rows takes many minutes and most of a large machine's memory.
Recorded: the estimate (for this CPU's compute dtype, and for a GPU's), the measured weights,
gradients, optimizer state and saved activations, and the peak — the torch profiler's CPU
allocator peak (the analogue of CUDA's ``max_memory_allocated``) and the process's peak RSS.

Resumable: ``benchmarks/results/fit.json`` keeps every finished row, and a row whose settings are
unchanged is not run again. ``--readme`` renders the "What fits" block from the file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, comma_names, machine_info, replace_readme_block  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NAME = "fit"
METHODS = ("full_rank", "galore", "low_rank_restarts", "lowrank_sparse_8bit")
RANKS = {"llama_350m": 256, "llama_1b": 512, "llama_7b": 1024}  # the memory table's r/d
LARGE = ("llama_7b",)  # run only with --methods and --options named


class Option(NamedTuple):
    """One storage option of a row: ``lowrank pretrain``'s ``--param-dtype``,
    ``--activation-checkpointing`` and ``--layerwise-step``."""

    weight_dtype: str
    checkpointing: bool
    layerwise: bool = False


OPTIONS = {
    "fp32": Option("float32", False),
    "bf16": Option("bfloat16", False),
    "bf16+ckpt": Option("bfloat16", True),
    "bf16+ckpt+layerwise": Option("bfloat16", True, layerwise=True),
}
# Settings added after rows were recorded, with the value those rows were measured with: a row
# without the key is the same row as one with its default (see unchanged()).
LATER_SETTINGS = Option._field_defaults
BLOCK = ("<!-- fit-table -->", "<!-- /fit-table -->")
GIB = 2**30
FITS_IN = 0.85  # a row is measured when its estimate is below this share of the machine's memory


def memory_bytes() -> int:
    """This machine's physical memory."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def row_settings(model: str, method: str, option: str, seq_len: int, batch_size: int, steps: int, device: str) -> dict:
    return {"model": model, "method": method, "option": option, "rank": RANKS[model], **OPTIONS[option]._asdict(),
            "seq_len": seq_len, "batch_size": batch_size, "steps": steps, "device": device}


def unchanged(row: dict, settings: dict) -> bool:
    """Whether a recorded row was measured with ``settings`` (a row recorded before a setting of
    :data:`LATER_SETTINGS` existed was measured with its default)."""
    return {**LATER_SETTINGS, **row["settings"]} == settings


def measure_row(settings: dict) -> dict:
    """One row, in this process (the parent runs each row in a fresh one)."""
    import torch

    from lowrank.memory.measure import measure_method

    torch.set_num_threads(1)
    device = torch.device(settings["device"])
    options = dict(rank=settings["rank"], weight_dtype=settings["weight_dtype"], state_dtype="float32",
                   batch_size=settings["batch_size"], seq_len=settings["seq_len"], checkpointing=settings["checkpointing"],
                   layerwise=settings["layerwise"])
    measured = measure_method(settings["model"], settings["method"], steps=settings["steps"], device=device, **options)
    return {
        "settings": settings,
        **estimates(settings),
        "measured": {k: getattr(measured, k) for k in ("weights", "gradients", "optimizer_state", "optimizer_extra",
                                                      "activations", "peak", "peak_optimizer_step", "peak_forward_backward",
                                                      "peak_rss", "seconds_per_step")},
    }


ESTIMATED = ("weights", "gradients", "optimizer_state", "optimizer_extra", "activations", "step_working_set", "total")


def estimates(settings: dict) -> dict:
    """A row's estimates, on the meta device (no step): for the measuring device's compute dtype
    (fp32 from bf16 storage on a CPU) and for a GPU's (bf16, ``torch._foreach_*`` batching)."""
    import torch

    from lowrank.dtypes import parse_dtype
    from lowrank.memory import estimate
    from lowrank.precision import compute_dtype

    options = dict(rank=settings["rank"], weight_dtype=settings["weight_dtype"], state_dtype="float32",
                   batch_size=settings["batch_size"], seq_len=settings["seq_len"], checkpointing=settings["checkpointing"],
                   layerwise=settings["layerwise"])
    device = torch.device(settings["device"])
    compute, _ = compute_dtype(device, parse_dtype(settings["weight_dtype"], "weight_dtype"), "auto")
    here = estimate(settings["model"], settings["method"], compute_dtype=compute, device=device, **options)
    gpu = estimate(settings["model"], settings["method"], device="cuda", **options)
    return {"estimate_cpu": {k: getattr(here, k) for k in ESTIMATED} | {"saved": here.activation_detail["saved"]},
            "estimate_gpu": {k: getattr(gpu, k) for k in ESTIMATED}}


def pretrain_row(settings: dict, out: Path) -> dict:
    """A run of ``lowrank pretrain`` itself (``--pretrain``): its losses, the allocator's peak of its
    second step and its peak RSS, beside the estimate for the same options and full-rank AdamW's."""
    flags = {"bfloat16": ["--param-dtype", "bf16"], "float32": ["--param-dtype", "fp32"]}[settings["weight_dtype"]]
    flags += ["--activation-checkpointing"] * settings["checkpointing"] + ["--layerwise-step"] * settings["layerwise"]
    command = [sys.executable, "-m", "lowrank", "pretrain", "--method", settings["method"], "--model", settings["model"],
               "--rank", str(settings["rank"]), *flags, "--data", "builtin", "--seq-len", str(settings["seq_len"]),
               "--batch-size", str(settings["batch_size"]), "--max-steps", str(settings["steps"]), "--lr", str(settings["lr"]),
               "--eval-every", "0", "--eval-tokens", str(4 * settings["seq_len"]), "--out", str(out), "--overwrite",
               "--json-out", str(out / "summary.json"), "--no-progress", "--no-plot"]
    env = {**os.environ, "OMP_NUM_THREADS": str(settings["threads"]), "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    mine, full = pretrain_estimates(settings)
    return {"settings": settings, "seconds": time.perf_counter() - started,
            "losses": [r["loss"] for r in records if "loss" in r], "val_loss": summary["val_loss"],
            "allocator_peak": summary["allocator_peak_bytes"], "peak_rss": summary["peak_memory_bytes"],
            "tokens_per_s": summary["tokens_per_s"], "estimate": mine, "full_rank_estimate": full}


def pretrain_estimates(settings: dict) -> tuple[dict, int]:
    """A ``--pretrain`` row's estimate (as a dict) on this CPU, and full-rank AdamW's total for the same options."""
    import torch

    from lowrank.dtypes import parse_dtype
    from lowrank.memory import estimate
    from lowrank.precision import compute_dtype

    options = dict(rank=settings["rank"], weight_dtype=settings["weight_dtype"], state_dtype="float32",
                   batch_size=settings["batch_size"], seq_len=settings["seq_len"], checkpointing=settings["checkpointing"],
                   layerwise=settings["layerwise"])
    compute, _ = compute_dtype(torch.device("cpu"), parse_dtype(settings["weight_dtype"], "weight_dtype"), "auto")
    mine = estimate(settings["model"], settings["method"], compute_dtype=compute, **options)
    full = estimate(settings["model"], "full_rank", compute_dtype=compute, **options)
    return mine.to_dict(), full.total


def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def render(data: dict) -> str:
    """The README block: per model, method and options, estimate vs measured peak."""
    rows = data.get("rows", {})
    if not rows and not data.get("trained"):
        return "No rows yet: run `python benchmarks/bench_fit.py`."
    first = next(iter(rows.values()), {"settings": {"batch_size": 1, "seq_len": 256}})["settings"]
    lines = [
        f"Two real steps of the trainer's step per row ({data['machine']['cpu']}, 1 thread; a GPU row: its device), batch "
        f"{first['batch_size']} × {first['seq_len']} tokens, the memory table's ranks; from "
        "`benchmarks/results/fit.json` (`python benchmarks/bench_fit.py`). *Options*: parameter storage (`fp32`, `bf16`), "
        "`+ckpt` activation checkpointing, `+layerwise` the optimizer step inside backward (`--layerwise-step`: one "
        "gradient alive at a time, so *gradients* is the largest parameter's). *Estimate*: `lowrank memory` for this "
        "CPU's compute dtype (fp32 activations from bf16 storage): weights + gradients + optimizer state + the larger "
        "of the activations and the *step's working set* (the optimizer step's own temporaries at their largest, "
        "`lowrank.optim.working_set`); *measured peak*: the torch profiler's peak of CPU "
        "allocations during the last step (the analogue of CUDA's `max_memory_allocated`); *GPU estimate*: the same "
        "run computing in bf16.",
        "",
        "| device | model | method | options | gradients GiB | step working set GiB | estimate GiB | measured peak GiB | "
        "difference | weights+grads+state measured = estimated | GPU estimate GiB |",
        "|---|---|---|---|---:|---:|---:|---:|---:|:---:|---:|",
    ]
    lines += [render_row(row) for row in sorted(rows.values(), key=_row_order)]
    lines += ["", *render_smallest(data)]
    trained = data.get("trained", {})
    if trained:
        lines += ["", "Trained end to end by `lowrank pretrain` (`--pretrain`; built layer by layer in the storage dtype): "
                  "the allocator's peak of its second step (the torch profiler's, as above) and the process's peak RSS "
                  "(every page it ever touched, freed ones the C allocator kept included), beside the estimate and "
                  "full-rank AdamW's estimate for the same shape and options.", "",
                  "| model | method | options | tokens / step | steps: train loss | estimate GiB | allocator peak GiB | "
                  "peak RSS GiB | full-rank estimate GiB | wall s per step (build, eval, save included) |", "|---|---|---|---:|---|---:|---:|---:|---:|---:|"]
        for row in trained.values():
            s = row["settings"]
            losses = " → ".join(f"{loss:.2f}" for loss in row["losses"])
            peak = f"{row['allocator_peak'] / GIB:.2f}" if row["allocator_peak"] else "-"
            lines.append(f"| {s['model']} | `{s['method']}` (rank {s['rank']}) | {s['option']} | {s['batch_size'] * s['seq_len']} | "
                         f"{losses} | {row['estimate']['total'] / GIB:.2f} | {peak} | {row['peak_rss'] / GIB:.2f} | "
                         f"{row['full_rank_estimate'] / GIB:.2f} | {row['seconds'] / s['steps']:.0f} |")
    return "\n".join(lines)


def _row_order(row: dict) -> tuple:
    """Device, then model, method and option in the order this script names them."""
    s = row["settings"]

    def index(value, known) -> tuple:
        known = list(known)
        return (known.index(value) if value in known else len(known), value)

    return s["device"], index(s["model"], RANKS), index(s["method"], METHODS), index(s["option"], OPTIONS)


def render_smallest(data: dict) -> list[str]:
    """Per model and method, the smallest measured peak over the option sets (rows and trained runs)."""
    best: dict[tuple[str, str], tuple[int, str]] = {}
    for row in data.get("rows", {}).values():
        s, peak = row["settings"], (row["measured"] or {}).get("peak")
        if peak and peak < best.get((s["model"], s["method"]), (float("inf"), ""))[0]:
            best[(s["model"], s["method"])] = (peak, s["option"])
    for row in data.get("trained", {}).values():
        s, peak = row["settings"], row["allocator_peak"]
        if peak and peak < best.get((s["model"], s["method"]), (float("inf"), ""))[0]:
            best[(s["model"], s["method"])] = (peak, f"{s['option']}, {s['batch_size'] * s['seq_len']} tokens, trained")
    order = list(RANKS)
    models = sorted({model for model, _ in best}, key=lambda m: (order.index(m) if m in order else len(order), m))
    methods = [m for m in METHODS if any((model, m) in best for model in models)]
    methods += sorted({method for _, method in best} - set(methods))
    lines = ["The smallest measured peak per model and method, GiB (its options), from the rows above:", "",
             "| method | " + " | ".join(m + (f" (r={RANKS[m]})" if m in RANKS else "") for m in models) + " |",
             "|---|" + "---:|" * len(models)]
    for method in methods:
        cells = [f"{best[(m, method)][0] / GIB:.2f} ({best[(m, method)][1]})" if (m, method) in best else "-" for m in models]
        lines.append(f"| `{method}` | " + " | ".join(cells) + " |")
    return lines


def render_row(row: dict) -> str:
    """One table line; ``-`` where the profiler gave no peak, and the reason where the row was not measured."""
    s, e, m = row["settings"], row["estimate_cpu"], row["measured"]
    if m is None:
        return (f"| {s['device']} | {s['model']} | `{s['method']}` | {s['option']} | - | {e['step_working_set'] / GIB:.2f} | "
                f"{e['total'] / GIB:.2f} | not measured: {row['not_measured']} | - | - | {row['estimate_gpu']['total'] / GIB:.2f} |")
    exact = all(m[k] == e[k] for k in ("weights", "gradients", "optimizer_state", "optimizer_extra"))
    peak = m["peak"]
    measured = f"{peak / GIB:.2f} | {(peak - e['total']) / e['total']:+.1%}" if peak else "- | -"
    return (f"| {s['device']} | {s['model']} | `{s['method']}` | {s['option']} | {m['gradients'] / GIB:.2f} | "
            f"{e['step_working_set'] / GIB:.2f} | {e['total'] / GIB:.2f} | {measured} | {'yes' if exact else 'no'} | "
            f"{row['estimate_gpu']['total'] / GIB:.2f} |")


def chosen(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Check ``--models`` / ``--methods`` / ``--options`` and fill the defaults: every method and
    option, except for the models of :data:`LARGE`, which run only what is named."""
    for name, values, known in (("--models", args.models, RANKS), ("--options", args.options or [], OPTIONS)):
        unknown = [value for value in values if value not in known]
        if unknown:
            parser.error(f"{name}: unknown {', '.join(unknown)}; choose from {', '.join(known)}")
    large = [model for model in args.models if model in LARGE]
    if large and (args.methods is None or args.options is None):
        parser.error(f"{', '.join(large)}: each row takes many minutes and most of a large machine's memory; name the "
                     "rows with --methods and --options (e.g. --methods lowrank_sparse_8bit --options bf16+ckpt+layerwise)")
    args.methods = list(METHODS) if args.methods is None else args.methods
    args.options = list(OPTIONS) if args.options is None else args.options


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=comma_names, default=["llama_350m", "llama_1b"],
                        help=f"comma-separated, of {', '.join(RANKS)} ({', '.join(LARGE)}: with --methods and --options)")
    parser.add_argument("--methods", type=comma_names, default=None, help=f"comma-separated (default: {', '.join(METHODS)})")
    parser.add_argument("--options", type=comma_names, default=None, help=f"comma-separated (default: {', '.join(OPTIONS)})")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: CUDA's max_memory_allocated peak")
    parser.add_argument("--out-dir", default=str(RESULTS))
    parser.add_argument("--readme", default=None, help="render the README's 'What fits' block from the results")
    parser.add_argument("--render", action="store_true", help="run no row: only render --readme from the results")
    parser.add_argument("--re-estimate", action="store_true",
                        help="run no row: recompute every recorded row's estimates with the current estimator "
                             "(the measurements stay as recorded)")
    parser.add_argument("--pretrain", type=int, default=0, metavar="STEPS",
                        help="instead of measured steps: train each chosen row with lowrank pretrain for STEPS steps")
    parser.add_argument("--lr", type=float, default=5e-4, help="--pretrain: the learning rate")
    parser.add_argument("--threads", type=int, default=2, help="--pretrain: threads of the run")
    parser.add_argument("--row", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row:
        print(json.dumps(measure_row(json.loads(args.row))))
        return
    chosen(parser, args)
    path = Path(args.out_dir) / f"{NAME}.json"
    if args.re_estimate:
        re_estimate(path)
    elif args.pretrain and not args.render:
        pretrain_rows(args, path)
    elif not args.render:
        run_rows(args, path)
    if args.readme:
        replace_readme_block(args.readme, *BLOCK, render(load(path)))


def re_estimate(path: Path) -> None:
    """``--re-estimate``: every recorded row's estimates from the current estimator (meta device,
    seconds); the measured figures are data and stay."""
    data = load(path)
    for row in data.get("rows", {}).values():
        row.update(estimates(row["settings"]))
    for row in data.get("trained", {}).values():
        mine, full = pretrain_estimates(row["settings"])
        row.update(estimate=mine, full_rank_estimate=full)
    path.write_text(json.dumps(data, indent=2) + "\n")


def pretrain_rows(args: argparse.Namespace, path: Path) -> None:
    """``--pretrain``: each chosen row trained by ``lowrank pretrain``, recorded under ``trained``."""
    data = load(path)
    trained = data.setdefault("trained", {})
    for model in args.models:
        for method in args.methods:
            for option in args.options:
                settings = {**row_settings(model, method, option, args.seq_len, args.batch_size, args.pretrain, "cpu"),
                            "lr": args.lr, "threads": args.threads}
                key = f"cpu/{model}/{method}/{option}"
                if key in trained and trained[key]["settings"] == settings:
                    continue
                print(f"{key}: lowrank pretrain, {args.pretrain} steps ...", flush=True)
                with tempfile.TemporaryDirectory() as tmp:
                    trained[key] = pretrain_row(settings, Path(tmp) / "run")
                data.update(benchmark=NAME, machine=machine_info())
                path.write_text(json.dumps(data, indent=2) + "\n")
                row = trained[key]
                print(f"  losses {row['losses']}, allocator peak {row['allocator_peak'] / GIB:.2f} GiB, estimate "
                      f"{row['estimate']['total'] / GIB:.2f} GiB", flush=True)


def run_rows(args: argparse.Namespace, path: Path) -> None:
    """Each chosen row not yet recorded with these settings, in a fresh process; ``path`` is
    rewritten after every row (resumable)."""
    data = load(path)
    rows = data.setdefault("rows", {})
    for model in args.models:
        for method in args.methods:
            for option in args.options:
                settings = row_settings(model, method, option, args.seq_len, args.batch_size, args.steps, args.device)
                key = f"{args.device}/{model}/{method}/{option}"
                if key in rows and unchanged(rows[key], settings) and rows[key]["measured"] is not None:
                    continue  # (a row not measured for lack of memory is tried again: this machine may have more)
                print(f"{key} ...", flush=True)
                planned = estimates(settings)
                if args.device == "cpu" and planned["estimate_cpu"]["total"] > FITS_IN * memory_bytes():
                    # the machine would swap or kill the row: recorded as not measured, with the reason
                    rows[key] = {"settings": settings, **planned, "measured": None,
                                 "not_measured": f"the estimate ({planned['estimate_cpu']['total'] / GIB:.1f} GiB) exceeds "
                                                 f"{FITS_IN:.0%} of this machine's {memory_bytes() / GIB:.1f} GiB"}
                    data.update(benchmark=NAME, machine=machine_info())
                    path.write_text(json.dumps(data, indent=2) + "\n")
                    print(f"  not measured: {rows[key]['not_measured']}", flush=True)
                    continue
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


if __name__ == "__main__":
    main()
