"""The README's memory tables: `lowrank memory` estimates for LLaMA-60M, 350M, 1B and 7B, every
method, bf16 weights and gradients, fp32 moments, one sequence of 2048 tokens or the model's
``max_position_embeddings`` when that is shorter (`lowrank memory`'s default), ranks as in GaLore.

    python benchmarks/bench_memory_table.py            # estimates → benchmarks/results/memory_llama_*.json, docs/*.png, README
    python benchmarks/bench_memory_table.py --render   # only re-render the README block from the JSON files

:func:`render_block` is also what ``tests/test_readme.py`` checks the README against.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from common import replace_readme_block  # noqa: E402 (benchmarks/ is on the path when run or tested)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MODELS = {"60m": 128, "350m": 256, "1b": 512, "7b": 1024}  # GaLore's ranks
MARKERS = ("<!-- memory-table -->", "<!-- /memory-table -->")


def run_estimates() -> None:
    for size, rank in MODELS.items():
        model = f"llama_{size}"
        command = [sys.executable, "-m", "lowrank", "memory", "--model", model, "--method", "all", "--rank", str(rank),
                   "--param-dtype", "bf16", "--state-dtype", "float32", "--batch-size", "1",
                   "--json", str(RESULTS / f"memory_{model}.json"), "--plot", str(ROOT / "docs" / f"memory_{model}.png")]
        subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)


def _gib(value: int) -> float:
    return value / 2**30


def render_block(results: Path = RESULTS) -> str:
    """Two tables from ``memory_llama_*.json``: total training memory and optimizer state, each
    with its ratio to full-rank AdamW; methods whose numbers are equal at every size share a row."""
    data = {size: json.loads((results / f"memory_llama_{size}.json").read_text()) for size in MODELS}
    methods = [e["method"] for e in data["60m"]["estimates"]]

    def row(method: str, key: str) -> tuple:
        cells = []
        for size in MODELS:
            estimates = {e["method"]: e for e in data[size]["estimates"]}
            base = estimates[data[size]["baseline"]["method"]][key]
            value = estimates[method][key]
            cells.append((round(_gib(value), 2), round(value / base, 2)))
        return tuple(cells)

    header = "| method | " + " | ".join(f"{size.upper()} (r={rank})" for size, rank in MODELS.items()) + " |"
    rule = "|---|" + "---:|" * len(MODELS)
    blocks = []
    for key, title in (("total", "Estimated training memory, GiB"), ("optimizer_state", "Optimizer state, GiB")):
        groups: dict[tuple, list[str]] = {}
        for method in methods:
            groups.setdefault(row(method, key), []).append(method)
        lines = [f"{title} (ratio to full-rank AdamW):", "", header, rule]
        for cells, names in sorted(groups.items(), key=lambda kv: (-kv[0][2][0], kv[1][0])):
            label = ", ".join(f"`{n}`" if n != "adamw8bit" else "`adamw8bit` (bitsandbytes)" for n in names)
            lines.append(f"| {label} | " + " | ".join(f"{gib:.2f} ({ratio:.2f}×)" for gib, ratio in cells) + " |")
        blocks.append("\n".join(lines))
    seq = ", ".join(f"{data[size]['settings']['seq_len']} ({size.upper()})" for size in MODELS)
    intro = (f"bf16 weights and gradients, {data['1b']['settings']['state_dtype']} moments, one sequence per step of "
             f"{seq} tokens (each model's max_position_embeddings, at most 2048), no activation checkpointing; from "
             "`benchmarks/results/memory_llama_{60m,350m,1b,7b}.json` (`python benchmarks/bench_memory_table.py`). "
             "Each row is a configuration `lowrank pretrain --param-dtype bf16` runs, except `adamw8bit`, bitsandbytes' "
             "optimizer, shown for reference: the trainer takes a peer optimizer only through the Python API's "
             "`optimizer_factory`, and only with fp32 storage (bf16 storage needs a per-parameter step).")
    return "\n\n".join([intro, *blocks])


def update_readme(readme: Path, block: str) -> None:
    if not replace_readme_block(readme, *MARKERS, block):
        raise SystemExit(f"{readme} has no {MARKERS[0]} ... {MARKERS[1]} block")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--render", action="store_true", help="only re-render the README block")
    parser.add_argument("--readme", default=str(ROOT / "README.md"))
    args = parser.parse_args()
    if not args.render:
        run_estimates()
    block = render_block()
    update_readme(Path(args.readme), block)
    print(block)


if __name__ == "__main__":
    main()
