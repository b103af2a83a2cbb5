"""Turn a suite's result file into the README table and two plots.

    python benchmarks/report.py --suite cpu-small [--readme README.md] [--docs docs]

Reads ``benchmarks/results/<suite>.json`` (written by ``compare.py``), prints a markdown table
(validation perplexity, tokens/s, optimizer-state and parameter+gradient+state memory, peak
memory, each also as a ratio to full-rank AdamW), replaces the README block between
``<!-- bench:<suite> -->`` and ``<!-- /bench:<suite> -->`` with it, and writes
``docs/<suite>_val_ppl.png`` (validation perplexity against tokens, every contender) and
``docs/<suite>_memory_vs_ppl.png`` (memory against perplexity).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "adamw"


def _mib(value: float) -> str:
    return f"{value / 2**20:,.1f}"


def _ratio(value: float, base: float | None) -> str:
    return f" ({value / base:.2f}×)" if base else ""


def completed(combined: dict) -> dict[str, dict]:
    """The suite's runs that finished, by contender name (failed runs carry only their exit code)."""
    return {name: r for name, r in combined["results"].items() if not r.get("failed")}


def table(combined: dict) -> str:
    """Markdown table of a suite, best first by validation perplexity."""
    results = completed(combined)
    base = results.get(BASELINE)
    rows = sorted(results.values(), key=lambda r: r["val_ppl"])
    lines = [
        "| contender | kind | lr | val ppl | tokens/s | optimizer state MiB | params+grads+state MiB | peak memory MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| `{r['contender']}` | {r['kind']} | {r['lr']:g} "
            f"| {r['val_ppl']:.2f}{_ratio(r['val_ppl'], base and base['val_ppl'])} "
            f"| {r['tokens_per_s']:,.0f}{_ratio(r['tokens_per_s'], base and base['tokens_per_s'])} "
            f"| {_mib(r['optimizer_state_bytes'])}{_ratio(r['optimizer_state_bytes'], base and base['optimizer_state_bytes'])} "
            f"| {_mib(r['model_state_bytes'])}{_ratio(r['model_state_bytes'], base and base['model_state_bytes'])} "
            f"| {_mib(r['peak_memory_bytes'])}{_ratio(r['peak_memory_bytes'], base and base['peak_memory_bytes'])} |"
        )
    failed = [name for name, r in combined["results"].items() if r.get("failed")]
    if failed:
        lines.append(f"\nFailed runs: {', '.join(failed)}.")
    return "\n".join(lines)


def sweep_lines(combined: dict) -> list[str]:
    """One line per swept contender: every learning rate tried and its perplexity."""
    lines = []
    for name, tries in combined.get("sweeps", {}).items():
        parts = ", ".join(f"{t['lr']:g} → {t['val_ppl']:.2f}" if t.get("val_ppl") is not None else f"{t['lr']:g} → failed"
                          for t in tries)
        lines.append(f"Learning-rate sweep for `{name}` (no published value; the best is in the table): {parts}.")
    return lines


def targets(combined: dict) -> list[str]:
    """The suite's targets checked against its own numbers (issue #6), one bullet each.

    "Our best memory-efficient method" is our contender with the lowest perplexity among those
    whose parameters + gradients + optimizer state are below full-rank AdamW's.
    """
    results = completed(combined)
    base = results.get(BASELINE)
    ours = [r for r in results.values() if r["kind"] == "ours" and (base is None or r["model_state_bytes"] < base["model_state_bytes"])]
    if not ours:
        return []
    best = min(ours, key=lambda r: r["val_ppl"])
    mark = {True: "met", False: "**not met**"}
    lines = [f"Our best memory-efficient contender here is `{best['contender']}` "
             f"(val ppl {best['val_ppl']:.2f}, {_mib(best['model_state_bytes'])} MiB parameters + gradients + state)."]
    for peer in ("galore-torch", "fira"):
        if peer in results:
            r = results[peer]
            lines.append(f"- vs `{peer}`: perplexity {best['val_ppl']:.2f} vs {r['val_ppl']:.2f} "
                         f"({mark[best['val_ppl'] <= r['val_ppl']]}), model-state memory {_mib(best['model_state_bytes'])} vs "
                         f"{_mib(r['model_state_bytes'])} MiB ({mark[best['model_state_bytes'] < r['model_state_bytes']]}).")
    if base is not None:
        ratio = best["val_ppl"] / base["val_ppl"]
        lines.append(f"- within 10 % of full-rank AdamW's perplexity: {ratio:.3f}× ({mark[ratio <= 1.10]}).")
        for name in ("low_rank", "low_rank_restarts"):
            if name in results:
                speed = results[name]["tokens_per_s"] / base["tokens_per_s"]
                lines.append(f"- `{name}` tokens/s vs AdamW: {speed:.2f}× ({mark[speed > 1.0]}; the target is set for "
                             f"the 60M shape and above, this suite's model is {combined['settings']['model']}).")
    return lines


def settings_line(combined: dict) -> str:
    s, machine = combined["settings"], combined["machine"]
    device = machine.get("gpu") or f"{machine['cpu']} ({machine['cpu_count']} cores, {machine['torch_threads']} threads)"
    return (
        f"{s['note']}; {s['tokens_per_contender']:,} tokens each ({s['steps']} steps of {s['batch_size']}×{s['seq_len']}), "
        f"seed {s['seed']}, rank {s['rank']}, every periodic event every {s['cycle']} steps, {s['precision']} on {device}, "
        f"torch {machine['torch']}; whole suite {combined['wall_seconds'] / 60:.0f} min."
    )


def plot(combined: dict, docs: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    suite = combined["suite"]
    results = completed(combined)
    docs.mkdir(parents=True, exist_ok=True)
    colors = plt.get_cmap("tab20").colors
    paths = []

    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=120)
    for i, (name, r) in enumerate(sorted(results.items(), key=lambda kv: kv[1]["val_ppl"])):
        curve = r["val_curve"]
        style = "-" if r["kind"] == "ours" else "--"
        ax.plot([p["tokens"] for p in curve], [p["val_ppl"] for p in curve], style, marker="o", markersize=3,
                color=colors[i % len(colors)], label=f"{name} ({r['val_ppl']:.1f})")
    ax.set_yscale("log")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation perplexity (log scale)")
    ax.set_title(f"{suite}: validation perplexity (solid: lowrank presets, dashed: peer packages)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    paths.append(docs / f"{suite}_val_ppl.png")
    fig.savefig(paths[-1])
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    for i, (name, r) in enumerate(sorted(results.items(), key=lambda kv: kv[1]["val_ppl"])):
        marker = "o" if r["kind"] == "ours" else "s"
        ax.scatter(r["model_state_bytes"] / 2**20, r["val_ppl"], color=colors[i % len(colors)], marker=marker, s=60)
        ax.annotate(name, (r["model_state_bytes"] / 2**20, r["val_ppl"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel("parameters + gradients + optimizer state (MiB)")
    ax.set_ylabel("validation perplexity")
    ax.set_title(f"{suite}: memory vs perplexity (lower left is better; circles: ours, squares: peers)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(docs / f"{suite}_memory_vs_ppl.png")
    fig.savefig(paths[-1])
    plt.close(fig)
    return paths


def render_block(combined: dict, plots: list[Path]) -> str:
    """The README block of a suite: settings, table, sweeps, targets and the two plots."""
    return "\n".join([
        settings_line(combined),
        "",
        table(combined),
        "",
        *sweep_lines(combined),
        "",
        *targets(combined),
        "",
        f"![validation perplexity against tokens]({plots[0]})",
        f"![memory against perplexity]({plots[1]})",
    ])


def update_readme(readme: Path, suite: str, block: str) -> bool:
    """Replace the marked block for ``suite``; returns False when the README has no markers."""
    text = readme.read_text()
    pattern = re.compile(rf"(<!-- bench:{re.escape(suite)} -->\n).*?(<!-- /bench:{re.escape(suite)} -->)", re.S)
    if not pattern.search(text):
        return False
    readme.write_text(pattern.sub(lambda m: m.group(1) + block + "\n" + m.group(2), text))
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default="cpu-small")
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--readme", default=str(ROOT / "README.md"))
    parser.add_argument("--docs", default=str(ROOT / "docs"))
    args = parser.parse_args()
    combined = json.loads((Path(args.results) / f"{args.suite}.json").read_text())
    paths = plot(combined, Path(args.docs))
    block = render_block(combined, [p.relative_to(ROOT) if p.is_relative_to(ROOT) else p for p in paths])
    print(block)
    if update_readme(Path(args.readme), args.suite, block):
        print(f"\nupdated the {args.suite} block of {args.readme}")


if __name__ == "__main__":
    main()
