"""What the memory options cost in speed: tokens/s of bf16 storage, activation checkpointing and
the optimizer step inside backward against the plain fp32 step, on ``cpu-long``'s model.

    python benchmarks/bench_step_cost.py --data ../shared/data/pydocs [--steps 25] [--rounds 3] [--cache-dir DIR] [--readme README.md]

Each (method, option set) is a short ``lowrank pretrain`` run in a fresh process (one thread, the
suite's shape, batch and rank); its tokens/s is the trainer's own summary figure (the median step
after the first three). The runs go round-robin — every option set once per round, ``--rounds``
rounds — so a change in the machine's load falls on all of them alike, and the figure kept is the
median over rounds. CPU figures: bf16 storage computes in fp32 here (no fast bf16 matmul), so its
cost is the casts and the per-parameter fp32 step; on a GPU bf16 compute changes the picture.
``full_rank`` runs as ProjectedAdamW in every row (the layerwise step needs a per-parameter step),
so the rows differ only by the option.

Writes ``benchmarks/results/step_cost.json``; ``--readme`` renders the block between
``<!-- step-cost -->`` markers from it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine_info, paired_relative, replace_readme_block, write_result  # noqa: E402
from suites import SUITES  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NAME = "step_cost"
SUITE = "cpu-long"
METHODS = {"full_rank": ["--set", "optimizer.name=projected_adamw"], "low_rank_restarts": []}
OPTIONS = {
    "fp32": [],
    "bf16": ["--param-dtype", "bf16"],
    "fp32+ckpt": ["--activation-checkpointing"],
    "fp32+layerwise": ["--layerwise-step"],
    "bf16+ckpt+layerwise": ["--param-dtype", "bf16", "--activation-checkpointing", "--layerwise-step"],
}
BASELINE = "fp32"
BLOCK = ("<!-- step-cost -->", "<!-- /step-cost -->")


def command(method: str, option: str, steps: int, data: str, out: Path, cache: Path) -> list[str]:
    suite = SUITES[SUITE]
    return [sys.executable, "-m", "lowrank", "pretrain", "--method", method, *METHODS[method], *OPTIONS[option],
            "--model", suite.model, "--data", data, "--vocab-size", str(suite.vocab_size), "--rank", str(suite.rank),
            "--batch-size", str(suite.batch_size), "--seq-len", str(suite.seq_len), "--max-steps", str(steps),
            "--eval-every", "0", "--eval-tokens", str(suite.seq_len), "--out", str(out), "--overwrite",
            "--cache-dir", str(cache), "--json-out", str(out / "summary.json"), "--no-progress", "--no-plot"]


def run(cmd: list[str]) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise SystemExit(result.stderr[-2000:])
    return json.loads(Path(cmd[cmd.index("--json-out") + 1]).read_text())


def measure(data: str, steps: int, rounds: int, cache: str | None = None) -> dict:
    data = str(Path(data).resolve())
    seen: dict[str, dict[str, list[float]]] = {m: {o: [] for o in OPTIONS} for m in METHODS}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cache = Path(cache) if cache else tmp / "cache"
        run(command("low_rank_restarts", BASELINE, 2, data, tmp / "warm", cache))  # tokenizer and caches
        for round_ in range(rounds):
            for method in METHODS:
                for option in OPTIONS:
                    summary = run(command(method, option, steps, data, tmp / f"{method}-{option}", cache))
                    seen[method][option].append(summary["tokens_per_s"])
                    print(f"round {round_ + 1}: {method} {option}: {summary['tokens_per_s']:.0f} tokens/s", flush=True)
    rows = []
    for method, options in seen.items():
        for option, values in options.items():
            ratios = paired_relative(values, options[BASELINE])
            rows.append({"method": method, "option": option, "tokens_per_s": statistics.median(values),
                         "per_round": values, "relative": statistics.median(ratios), "relative_per_round": ratios})
    return {"suite": SUITE, "steps": steps, "rounds": rounds, "machine": machine_info(), "rows": rows}


def render(data: dict) -> str:
    suite = SUITES[data["suite"]]
    lines = [f"Tokens/s on `{data['suite']}`'s model ({suite.model}, batch {suite.batch_size} × {suite.seq_len}, one thread, "
             f"{data['machine'].get('cpu', 'CPU')}): median over {data['rounds']} interleaved rounds of {data['steps']}-step "
             "runs (each run's median step); relative: the median over rounds of the ratio to fp32 of the same method "
             "in the same round.", "",
             "| method | " + " | ".join(OPTIONS) + " |", "|---|" + "---:|" * len(OPTIONS)]
    for method in METHODS:
        cells = []
        for option in OPTIONS:
            row = next(r for r in data["rows"] if r["method"] == method and r["option"] == option)
            cells.append(f"{row['tokens_per_s']:,.0f} ({row['relative']:.2f}×)")
        lines.append(f"| `{method}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="the corpus (e.g. ../shared/data/pydocs); omit with --readme to render only")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--readme", default=None)
    parser.add_argument("--cache-dir", default=None,
                        help="the tokenizer and token cache to reuse (e.g. a cpu-long run folder's cache); default: a fresh one")
    args = parser.parse_args()
    if args.data:
        path = write_result(NAME, measure(args.data, args.steps, args.rounds, args.cache_dir))
        print(f"wrote {path}")
    if args.readme:
        data = json.loads((RESULTS / f"{NAME}.json").read_text())
        replace_readme_block(args.readme, *BLOCK, render(data))


if __name__ == "__main__":
    main()
