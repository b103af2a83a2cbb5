"""Render ``benchmarks/results/osp.json`` (written by ``bench_osp.py``): the README block, the
plot ``docs/osp_ppl_vs_bits.png`` and a short plain-text table.

    python benchmarks/osp_report.py [--json benchmarks/results/osp.json] [--readme README.md] [--plot PNG]

With ``--readme``, the block between ``<!-- osp -->`` and ``<!-- /osp -->`` is
replaced (nothing is written when the README has no such markers). Every number and every
verdict of the block is computed from the JSON.

The verdicts (one line per seed-paper direction) compare single runs (one seed each): a relative
difference under :data:`TIE` (1 %) counts as a tie (for ppl gaps: gaps within 0.01), and a
direction "reproduces" only when every comparison it covers goes its way by more than that.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import RESULTS, replace_readme_block  # noqa: E402 (benchmarks/ is on the path when run or tested)

ROOT = Path(__file__).resolve().parents[1]
BASELINE, OSP = "adamw", "osp"
SCHEMES = ("w4", "w3", "w2", "w4a4", "w8a8")
"""The quantized schemes of the quant-eval table, in column order (``fp`` is the reference)."""
BITS = {"fp": 16, "w4": 4, "w3": 3, "w2": 2}
"""Weight bits of the weight-only schemes, the x positions of the plot's lines."""
PTQ_VARIANTS = {
    "rtn": {"method": "rtn"},
    "apiq (ours)": {"method": "apiq", "recipe": "ours"},
    "apiq (published)": {"method": "apiq", "recipe": "apiq"},
    "apiq+saliency (ours)": {"method": "apiq+saliency", "recipe": "ours", "saliency": "activation"},
    "apiq+saliency (published)": {"method": "apiq+saliency", "recipe": "apiq", "saliency": "fisher"},
}
"""The PTQ rows: round-to-nearest; ApiQ under our recipe and under ApiQ's released one
(:data:`lowrank.quant.recipes.RECIPES`); the saliency regularizer in our form (``|W|·‖X_j‖`` on
``Q + sBA``, relative, every step, our recipe) and in the published one (Fisher-weighted
``(Q(W) − W)²`` in the weight-preservation steps, the released recipe)."""
PTQ_METHODS = tuple(PTQ_VARIANTS)
COMPARISONS = (
    ("apiq (ours)", "rtn", "ApiQ with our recipe (closed-form init, learned clipping, retraining) beats RTN"),
    ("apiq (published)", "rtn", "ApiQ with its released recipe beats RTN"),
    ("apiq+saliency (ours)", "apiq (ours)", "Our saliency form improves on plain ApiQ (our recipe)"),
    ("apiq+saliency (published)", "apiq (published)",
     "The published saliency-aware regularizer improves on plain ApiQ (released recipe)"),
)
"""The PTQ directions checked: ``(better, worse, claim)``."""
TIE = 0.01
"""Ties (one seed per run): perplexities or kurtoses within 1 % of each other, ppl gaps within 0.01."""


# ---------------------------------------------------------------------- helpers


def _num(value: float | None, digits: int = 3) -> str:
    """``value`` with about ``digits`` significant digits, thousands separated; ``-`` for None."""
    if value is None:
        return "-"
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 10 ** digits:
        return f"{value:,.0f}"
    decimals = max(0, digits - 1 - int(f"{magnitude:e}".split("e")[1]))
    return f"{value:,.{decimals}f}"


def _gap(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}×"


def names(osp: dict) -> dict[str, str]:
    """A display name per run label: the contender, or ``contender (label)`` where a contender
    has several runs."""
    counts: dict[str, int] = {}
    for run in osp["runs"]:
        counts[run["contender"]] = counts.get(run["contender"], 0) + 1
    return {run["label"]: run["contender"] if counts[run["contender"]] == 1 else f"{run['contender']} ({run['label']})"
            for run in osp["runs"]}


def representative(osp: dict, contender: str) -> dict | None:
    """The run a contender is judged by: its PTQ run when there is one, else its lowest training ppl."""
    runs = [r for r in osp["runs"] if r["contender"] == contender]
    if not runs:
        return None
    with_ptq = [r for r in runs if r.get("ptq")]
    return min(with_ptq or runs, key=lambda r: r["training"]["val_ppl"])


def ptq_rows(run: dict | None) -> dict[tuple[int, str], dict]:
    """``{(bits, variant): row}`` of a run's PTQ results (``method`` for JSON written before variants)."""
    if not run or not run.get("ptq"):
        return {}
    return {(row["bits"], row.get("variant", row["method"])): row for row in run["ptq"]["results"]}


def _outcome(better: float, worse: float) -> int:
    """+1 when ``better`` is lower than ``worse`` by more than :data:`TIE` (relative), −1 when
    higher by more than that, 0 for a tie."""
    if worse == 0:
        return 0 if better == 0 else -1
    relative = better / worse - 1
    return 1 if relative < -TIE else -1 if relative > TIE else 0


def _gap_outcome(better: float, worse: float) -> int:
    """:func:`_outcome` for two ppl gaps (quantized / full-precision ppl): a tie when they differ by
    less than :data:`TIE` (one percentage point of perplexity), whatever their size."""
    return 1 if better < worse - TIE else -1 if better > worse + TIE else 0


def _verdict(outcomes: list[int], tie: str = f"{TIE:.0%}") -> str:
    if not outcomes:
        return "cannot be checked"
    n, wins, losses = len(outcomes), outcomes.count(1), outcomes.count(-1)
    ties = n - wins - losses
    if wins == n:
        return "**reproduces**"
    if losses == n:
        return "**does not reproduce**"
    if wins == 0 and losses == 0:
        return f"**not decided** (every difference within {tie})"
    counts = f"{wins} of {n} comparisons as claimed, {losses} the other way, {ties} within {tie}"
    if losses == 0:
        return f"**reproduces where decided** ({counts})"
    if wins == 0:
        return f"**does not reproduce where decided** ({counts})"
    return f"**mixed** ({counts})"


# ---------------------------------------------------------------------- tables


def quant_table(osp: dict) -> list[str]:
    """Markdown: per run, training val ppl, kurtosis, max |act|, and the ppl gap of each scheme."""
    display = names(osp)
    header = ["contender", "val ppl (training)", "val ppl (fp, folded/merged)", "excess kurtosis (ours)",
              "excess kurtosis (OSP protocol)", "max \\|act\\|", *[f"{s.upper()} gap" for s in SCHEMES]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in osp["runs"]:
        q = run["quant_eval"]
        cells = [f"`{display[run['label']]}`", _num(run["training"]["val_ppl"], 4), _num(q["schemes"]["fp"]["ppl"], 4),
                 _num(q["kurtosis"]), _num(q.get("kurtosis_osp")), _num(q["max_abs"]), *[_gap(q["gaps"].get(s)) for s in SCHEMES]]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def ptq_table(osp: dict) -> list[str]:
    """Markdown: validation ppl (and its ratio to full precision) of each PTQ method at each bit
    width, one column per PTQ'd contender."""
    runs = [r for r in osp["runs"] if r.get("ptq")]
    if not runs:
        return []
    display = names(osp)
    settings = osp["settings"]["ptq"]
    header = ["bits", "method", *[f"`{display[r['label']]}` ppl (× fp)" for r in runs]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines.append("| 16 | full precision | " + " | ".join(_num(r["ptq"]["fp_ppl"], 4) for r in runs) + " |")
    for bits in settings["bits"]:
        for method in settings["methods"]:
            cells = []
            for run in runs:
                row = ptq_rows(run).get((bits, method))
                cells.append("-" if row is None else f"{_num(row['val_ppl'], 4)} ({row['gap']:.2f}×)")
            lines.append(f"| {bits} | {method} | " + " | ".join(cells) + " |")
    return lines


def directions(osp: dict) -> list[str]:
    """One line per seed-paper direction, with the numbers and a plain verdict."""
    adamw, osp_run = representative(osp, BASELINE), representative(osp, OSP)
    lines = []
    missing = [name for name, run in ((BASELINE, adamw), (OSP, osp_run)) if run is None]
    if missing:
        why = f"cannot be checked (no finished {' or '.join(missing)} run)"
        lines.append(f"- OSP has lower excess kurtosis than AdamW: {why}.")
        lines.append(f"- OSP loses less perplexity under W4 / W4A4: {why}.")
    else:
        key = "kurtosis_osp" if "kurtosis_osp" in adamw["quant_eval"] and "kurtosis_osp" in osp_run["quant_eval"] else "kurtosis"
        protocol = "OSP's protocol" if key == "kurtosis_osp" else "our protocol"
        ka, ko = adamw["quant_eval"][key], osp_run["quant_eval"][key]
        ratio = f"{ka / ko:,.1f}× lower" if ko > 0 and ko < ka else f"{ko / ka:,.2f}× AdamW's" if ka > 0 else ""
        lines.append(f"- OSP has lower excess kurtosis than AdamW ({protocol}; OSP paper: 0.04 vs 1818.56 at 1.4B): "
                     f"{_verdict([_outcome(ko, ka)])} — OSP {_num(ko)} vs AdamW {_num(ka)}"
                     f"{f' ({ratio})' if ratio else ''}; max |act| {_num(osp_run['quant_eval']['max_abs'])} vs "
                     f"{_num(adamw['quant_eval']['max_abs'])}.")
        outcomes, parts = [], []
        for scheme in ("w4", "w4a4"):
            go, ga = osp_run["quant_eval"]["gaps"][scheme], adamw["quant_eval"]["gaps"][scheme]
            outcomes.append(_gap_outcome(go, ga))
            parts.append(f"{scheme.upper()} ppl gap OSP {go:.3f}× vs AdamW {ga:.3f}×")
        lines.append(f"- OSP loses less perplexity than AdamW under W4 and W4A4 (gap = quantized / full-precision ppl; "
                     f"gaps within {TIE:.2f} of each other are ties): {_verdict(outcomes, f'{TIE:.2f}')} — {'; '.join(parts)}.")
    for better, worse, claim in COMPARISONS:
        outcomes, parts = [], []
        for run in (r for r in osp["runs"] if r.get("ptq")):
            rows = ptq_rows(run)
            for bits in osp["settings"]["ptq"]["bits"]:
                a, b = rows.get((bits, better)), rows.get((bits, worse))
                if a is None or b is None:
                    continue
                outcomes.append(_outcome(a["val_ppl"], b["val_ppl"]))
                parts.append(f"{names(osp)[run['label']]} {bits}-bit {_num(a['val_ppl'], 4)} vs {_num(b['val_ppl'], 4)}")
        detail = f" — {'; '.join(parts)}" if parts else " (no PTQ results)"
        lines.append(f"- {claim} (validation ppl, {better} vs {worse}): {_verdict(outcomes)}{detail}.")
    return lines


def settings_line(osp: dict) -> str:
    s, machine = osp["settings"], osp["machine"]
    ptq = s["ptq"]
    load = machine.get("load_average", {})
    load_text = f", load average {load['start'][0]:.1f} → {load['end'][0]:.1f}" if load else ""
    return (
        f"Suite `{osp['suite']}`: {len(osp['runs'])} runs' final checkpoints "
        f"({s['training'].get('steps')} steps, model {s['training'].get('model')}). Quant-eval on the "
        f"{s['eval']['tokens']:,} validation tokens ({s['eval']['chunks']} × {s['eval']['seq_len']}; "
        f"{'the chunks training evaluated' if s['eval']['subset'] is None else s['eval']['subset']}): weights "
        f"{s['quant_eval']['weights']}, activations {s['quant_eval']['activations']}, every linear layer but the head. "
        f"PTQ ({', '.join(ptq['methods'])}) at {', '.join(map(str, ptq['bits']))} bits, "
        f"{ptq['format_note']}, rank {ptq['rank']}, "
        f"{ptq.get('recipe_note') or str(ptq['steps']) + ' retraining steps per block'}, "
        f"{ptq['calibration_tokens']:,} calibration tokens from the training split, seed {ptq['seed']}. "
        f"{machine['cpu']} ({machine['cpu_count']} cores), {machine['torch_threads']} thread(s){load_text}, "
        f"torch {machine['torch']}; {osp['seconds_total'] / 60:.0f} min."
    )


def render_block(osp: dict) -> str:
    """The README block of the quantization-readiness benchmark (module docstring): settings, the
    quant-eval table, the PTQ table, one verdict line per seed-paper direction, the plot."""
    sections = [[settings_line(osp)], quant_table(osp), ptq_table(osp),
                [f"Directions of the seed papers at this scale (one seed; differences under {TIE:.0%} are ties):",
                 *directions(osp)]]
    if osp.get("plot"):
        sections.append([f"![validation perplexity against bits per weight]({osp['plot']})"])
    return "\n\n".join("\n".join(section) for section in sections if section)


def text_table(osp: dict) -> str:
    """A short plain-text summary for the terminal."""
    display = names(osp)
    width = max([len(n) for n in display.values()] + [9])
    lines = [f"{'contender':<{width}} {'ppl':>8} {'kurt':>9} {'max|x|':>8} " + " ".join(f"{s:>6}" for s in SCHEMES)]
    for run in osp["runs"]:
        q = run["quant_eval"]
        lines.append(f"{display[run['label']]:<{width}} {q['schemes']['fp']['ppl']:>8.2f} {q['kurtosis']:>9.3f} "
                     f"{q['max_abs']:>8.2f} " + " ".join(f"{q['gaps'][s]:>6.3f}" for s in SCHEMES))
    for run in (r for r in osp["runs"] if r.get("ptq")):
        rows = ptq_rows(run)
        lines.append(f"PTQ {display[run['label']]} (fp {run['ptq']['fp_ppl']:.2f}): " + "; ".join(
            f"{bits}b " + ", ".join(f"{m} {rows[(bits, m)]['val_ppl']:.2f}" for m in osp["settings"]["ptq"]["methods"]
                                    if (bits, m) in rows)
            for bits in osp["settings"]["ptq"]["bits"]))
    return "\n".join(lines)


# ---------------------------------------------------------------------- plot


def plot(osp: dict, path: str | Path) -> Path:
    """Validation ppl against bits per weight (log y): a line per run through full precision (16)
    and W4/W3/W2; W4A4 (at 4) and W8A8 (at 8) as separate markers in the run's colour; the PTQ
    results (per method a marker) at their base bits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, NullFormatter

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    display = names(osp)
    colors = plt.get_cmap("tab10").colors
    markers = {"rtn": "X", "apiq": "D", "apiq+saliency": "*", "apiq (ours)": "D", "apiq (published)": "d",
               "apiq+saliency (ours)": "*", "apiq+saliency (published)": "P"}
    big = {"apiq+saliency", "apiq+saliency (ours)", "apiq+saliency (published)"}
    # log2 offsets, so the markers do not overlap
    shift = {"rtn": -0.08, "apiq": 0.0, "apiq+saliency": 0.06, "apiq (ours)": -0.04, "apiq (published)": 0.0,
             "apiq+saliency (ours)": 0.04, "apiq+saliency (published)": 0.08}
    fig, ax = plt.subplots(figsize=(11, 6), dpi=120)
    for i, run in enumerate(osp["runs"]):
        color = colors[i % len(colors)]
        schemes = run["quant_eval"]["schemes"]
        xs = [BITS[s] for s in ("fp", "w4", "w3", "w2")]
        ax.plot(xs, [schemes[s]["ppl"] for s in ("fp", "w4", "w3", "w2")], "-o", color=color, markersize=5,
                label=f"{display[run['label']]} (fp {schemes['fp']['ppl']:.1f}, kurtosis {_num(run['quant_eval']['kurtosis'])})")
        ax.plot([4], [schemes["w4a4"]["ppl"]], "^", color=color, markersize=8, markeredgecolor="black", linestyle="none")
        ax.plot([8], [schemes["w8a8"]["ppl"]], "s", color=color, markersize=7, markeredgecolor="black", linestyle="none")
        for row in (run.get("ptq") or {}).get("results", []):
            variant = row.get("variant", row["method"])
            ax.plot([row["bits"] * 2 ** shift.get(variant, 0.0)], [row["val_ppl"]], markers.get(variant, "P"),
                    color=color, markersize=10 if variant in big else 7, markeredgecolor="black",
                    linestyle="none")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ticks = [2, 3, 4, 8, 16]
    ax.set_xticks(ticks)
    ax.set_xticklabels(["2", "3", "4", "8\n(W8A8)", "16\n(full)"])
    ax.set_xlim(1.8, 18)
    ax.invert_xaxis()  # from full precision (left) to 2 bits (right): degradation reads left to right
    ax.set_xlabel("bits per weight (nominal; scales and factors not counted)")
    ax.set_ylabel("validation perplexity (log scale)")
    ax.set_title(f"{osp['suite']}: validation perplexity under quantization")
    ax.grid(alpha=0.3, which="both")
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    ax.yaxis.set_major_formatter(plain)
    low, high = ax.get_ylim()
    ax.yaxis.set_minor_formatter(plain if high / low < 10 else NullFormatter())  # label minor ticks within a decade
    runs_legend = ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, title_fontsize=8,
                            title="trained contender\n(line: RTN weights, W16 → W4 → W3 → W2)")
    ax.add_artist(runs_legend)
    ptq = osp["settings"]["ptq"]
    keys = [Line2D([], [], marker="^", color="gray", markeredgecolor="black", linestyle="none", label="W4A4 (RTN, per-token acts)"),
            Line2D([], [], marker="s", color="gray", markeredgecolor="black", linestyle="none", label="W8A8 (RTN, per-token acts)")]
    if any(r.get("ptq") for r in osp["runs"]):
        keys += [Line2D([], [], marker=markers[m], color="gray", markeredgecolor="black", linestyle="none",
                        markersize=10 if m in big else 7, label=f"PTQ {m} ({ptq['format_short']}, rank {ptq['rank']})")
                 for m in ptq["methods"] if m in markers]
    ax.legend(handles=keys, loc="lower left", bbox_to_anchor=(1.01, 0.0), fontsize=8, title="markers (colour: contender)",
              title_fontsize=8)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


# ---------------------------------------------------------------------- command line


def update_readme(readme: Path, block: str) -> bool:
    """Replace the ``<!-- osp -->`` block; False when the README has no markers."""
    return replace_readme_block(readme, "<!-- osp -->", "<!-- /osp -->", block)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=str(RESULTS / "osp.json"))
    parser.add_argument("--readme", default=None, help="README whose <!-- osp --> block to replace")
    parser.add_argument("--plot", default=None, help="also (re)draw the plot here")
    args = parser.parse_args()
    osp = json.loads(Path(args.json).read_text())
    if args.plot:
        plot(osp, args.plot)
    block = render_block(osp)
    print(block)
    if args.readme and update_readme(Path(args.readme), block):
        print(f"\nupdated the osp block of {args.readme}")


if __name__ == "__main__":
    main()
