"""Quiet tokens/s of a suite's contenders: the speed figure the suite's own runs cannot give.

A suite's runs go side by side (``--jobs 2``) for hours while other work shares the machine, so
the tokens/s each records mixes the method's cost with the load of that hour (issue 21: "take
speed figures from quiet runs only"). This script measures every contender of a suite at the
suite's model, batch, rank and event clock with nothing else running: a ``steps``-step run per
contender through the suite's own path (``compare.py --run-one``, in a fresh process, one thread),
round-robin over ``rounds`` rounds so that a drift in the machine's speed falls on all of them
alike. Kept per contender: the median over rounds of the run's tokens/s (the trainer's median
step after the first three), and the median over rounds of its ratio to AdamW in the same round.

Speed does not depend on the learning rate, so every contender runs at its sweep's centre (ratio 1
where it has one). A run this short holds no periodic event (refactorization, merge, projector
refresh: every ``cycle`` steps); their amortised cost is in ``bench_refactorize.py`` and
``bench_projection_time.py``.

    python benchmarks/bench_suite_speed.py --suite cpu-long --data ../shared/data/pydocs [--steps 40] [--rounds 3]

Writes ``benchmarks/results/<suite>-speed.json``; ``report.py`` takes the suite table's tokens/s
from it when it exists (and says so).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, comma_names, paired_relative, suite_speed_name, write_result  # noqa: E402
from compare import base_lr, has_ratio, run_settings  # noqa: E402
from plan import RunSpec  # noqa: E402
from suites import CONTENDERS, SUITES  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "adamw"


def short_suite(suite_name: str, steps: int):
    """The suite's training settings for a ``steps``-step run: one evaluation of one batch at the
    end (the trainer needs one), no checkpoints; the warm-start fraction (ReLoRA) is kept."""
    suite = SUITES[suite_name]
    return dataclasses.replace(suite, steps=steps, eval_every=steps, eval_tokens=suite.batch_size * suite.seq_len,
                               save_every=0, keep_checkpoints=False)


def run_once(suite_name: str, name: str, steps: int, data: str, work: Path) -> float:
    """Tokens/s of one ``steps``-step run of contender ``name``, in a fresh single-threaded process."""
    spec = RunSpec(0, name, base_lr(CONTENDERS[name]), 1.0 if has_ratio(CONTENDERS[name]) else None, 0)
    settings = run_settings(suite_name, short_suite(suite_name, steps), spec, data)
    out_json = work / "results" / f"{name}.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    command = [sys.executable, str(ROOT / "benchmarks" / "compare.py"), "--run-one", json.dumps(settings),
               "--out-json", str(out_json), "--work", str(work), "--threads", "1"]
    done = subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-2000:]}")
    record = json.loads(out_json.read_text())
    if record.get("failed"):
        raise SystemExit(f"{name} diverged in {steps} steps: {record.get('reason')}")
    return record["tokens_per_s"]


def measure(suite_name: str, names: list[str], data: str, steps: int, rounds: int, cache: str | None) -> dict:
    if BASELINE not in names:
        raise SystemExit(f"the ratios are to {BASELINE}: add it to --contenders")
    data = str(Path(data).resolve())
    seen: dict[str, list[float]] = {name: [] for name in names}
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if cache:  # the suite's tokenizer and token cache (read only), instead of training a BPE again
            (work / suite_name).mkdir(parents=True)
            (work / suite_name / "cache").symlink_to(Path(cache).resolve(), target_is_directory=True)
        run_once(suite_name, BASELINE, 2, data, work)  # builds the caches when there are none
        for round_ in range(rounds):
            for name in names:
                seen[name].append(run_once(suite_name, name, steps, data, work))
                print(f"round {round_ + 1}: {name}: {seen[name][-1]:,.0f} tokens/s", flush=True)
            load.append(os.getloadavg()[0])
    contenders = {}
    for name, values in seen.items():
        relative = paired_relative(values, seen[BASELINE])
        contenders[name] = {"tokens_per_s": statistics.median(values), "per_round": values,
                            "vs_adamw": statistics.median(relative), "vs_adamw_per_round": relative}
    return {"suite": suite_name, "steps": steps, "rounds": rounds, "threads_per_run": 1,
            "load_average_per_round": load, "contenders": contenders}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=sorted(SUITES), default="cpu-long")
    parser.add_argument("--data", required=True, help="the corpus (e.g. ../shared/data/pydocs)")
    parser.add_argument("--contenders", type=comma_names, default=None, help="comma-separated (default: the suite's)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cache-dir", default=None,
                        help="the suite runner's tokenizer and token cache (default: runs/bench/<suite>/cache if "
                             "present, else a fresh one)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    cache = args.cache_dir
    default_cache = ROOT / "runs" / "bench" / args.suite / "cache"
    if cache is None and default_cache.is_dir():
        cache = str(default_cache)
    names = args.contenders or list(SUITES[args.suite].contenders)
    path = write_result(suite_speed_name(args.suite), measure(args.suite, names, args.data, args.steps, args.rounds, cache),
                        args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
