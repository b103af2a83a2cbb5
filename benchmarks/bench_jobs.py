"""Is ``compare.py --jobs 2`` (two single-threaded runs side by side) faster in total than running
the same two runs one after the other with two threads each?

    python benchmarks/bench_jobs.py --data ../shared/data/pydocs [--suite cpu-long] [--steps 100]

Trains two short runs of the suite's model (AdamW and low-rank, the suite's shape and batch) both
ways on an otherwise idle machine and writes ``benchmarks/results/jobs.json``: wall time of each
way and each run's tokens/s.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402
from suites import SUITES  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def command(method: str, suite, steps: int, data: str, out: Path, cache: Path) -> list[str]:
    return [sys.executable, "-m", "lowrank", "pretrain", "--method", method, "--model", suite.model, "--data", data,
            "--vocab-size", str(suite.vocab_size), "--rank", str(suite.rank), "--batch-size", str(suite.batch_size),
            "--seq-len", str(suite.seq_len), "--max-steps", str(steps), "--eval-every", "0", "--eval-tokens", str(suite.seq_len),
            "--out", str(out), "--overwrite", "--cache-dir", str(cache), "--json-out", str(out / "summary.json"),
            "--no-progress", "--no-plot"]


def launch(cmd: list[str], threads: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> None:
    _, err = process.communicate()
    if process.returncode != 0:
        raise SystemExit(err[-2000:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--suite", default="cpu-long")
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    suite = SUITES[args.suite]
    data = str(Path(args.data).resolve())
    methods = ("full_rank", "low_rank")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        finish(launch(command("low_rank", suite, 2, data, tmp / "warm", tmp / "cache"), 2))  # tokenizer and caches
        ways = {}
        started = time.perf_counter()
        for method in methods:
            finish(launch(command(method, suite, args.steps, data, tmp / f"seq-{method}", tmp / "cache"), 2))
        ways["sequential, 2 threads each"] = {"wall_seconds": time.perf_counter() - started, "prefix": "seq"}
        started = time.perf_counter()
        running = [launch(command(method, suite, args.steps, data, tmp / f"par-{method}", tmp / "cache"), 1) for method in methods]
        for process in running:
            finish(process)
        ways["side by side (--jobs 2), 1 thread each"] = {"wall_seconds": time.perf_counter() - started, "prefix": "par"}
        for way in ways.values():
            prefix = way.pop("prefix")
            way["tokens_per_s"] = {m: json.loads((tmp / f"{prefix}-{m}" / "summary.json").read_text())["tokens_per_s"]
                                   for m in methods}
    sequential, parallel = ways.values()
    path = write_result("jobs", {
        "suite": args.suite, "model": suite.model, "steps_per_run": args.steps, "runs": list(methods),
        "ways": ways, "speedup_of_jobs_2": sequential["wall_seconds"] / parallel["wall_seconds"],
        "note": "wall time includes each run's start-up (imports, data cache load, model build)",
        "load_average_after": os.getloadavg()[0],
    })
    print(json.dumps(json.loads(path.read_text())["ways"], indent=1))
    print(f"--jobs 2 is {sequential['wall_seconds'] / parallel['wall_seconds']:.2f}× the throughput -> {path}")


if __name__ == "__main__":
    main()
