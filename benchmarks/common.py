"""Shared helpers for benchmark scripts: machine description, timing, result files."""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine_info() -> dict:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    return info


def median_seconds(fn, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def suite_speed_name(suite: str) -> str:
    """The result name of a suite's quiet speed measurement (``bench_suite_speed.py``), which
    ``report.py`` reads: ``benchmarks/results/<suite>-speed.json``."""
    return f"{suite}-speed"


def paired_relative(values: list[float], baseline: list[float]) -> list[float]:
    """Each round's figure over the baseline's in the same round: runs minutes apart under the same
    load, so a drift in the machine's speed cancels in each ratio (take the median of these)."""
    if len(values) != len(baseline):
        raise ValueError(f"{len(values)} rounds against {len(baseline)} of the baseline")
    return [value / base for value, base in zip(values, baseline)]


def write_result(name: str, data: dict, out_dir: Path | str | None = None) -> Path:
    """Write ``data`` plus machine info to ``<out_dir>/<name>.json`` and return the path."""
    out_dir = Path(out_dir) if out_dir else RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    payload = {"benchmark": name, "machine": machine_info(), **data}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def replace_readme_block(readme: Path | str, start: str, end: str, block: str) -> bool:
    """Put ``block`` between the marker lines ``start`` and ``end`` of ``readme`` (what was there
    goes); ``False``, and the file untouched, when the README has no such markers."""
    readme = Path(readme)
    text = readme.read_text()
    pattern = re.compile(rf"({re.escape(start)}\n).*?({re.escape(end)})", re.S)
    if not pattern.search(text):
        return False
    readme.write_text(pattern.sub(lambda m: m.group(1) + block + "\n" + m.group(2), text))
    return True


def comma_names(text: str) -> list[str]:
    """``"a, b,c"`` → ``["a", "b", "c"]`` (an argparse ``type``)."""
    return [part.strip() for part in text.split(",") if part.strip()]


def add_model_arguments(parser, suite) -> None:
    """``--model``, ``--vocab-size``, ``--tokenizer``, ``--rank``, ``--batch-size``, ``--seq-len``,
    defaulting to those of ``suite`` (a ``suites.Suite``): a diagnostic measures a suite's shape."""
    parser.add_argument("--model", default=suite.model)
    parser.add_argument("--vocab-size", type=int, default=suite.vocab_size)
    parser.add_argument("--tokenizer", default=None, help="a trained tokenizer folder (default: BPE trained on the corpus)")
    parser.add_argument("--rank", type=int, default=suite.rank)
    parser.add_argument("--batch-size", type=int, default=suite.batch_size)
    parser.add_argument("--seq-len", type=int, default=suite.seq_len)
