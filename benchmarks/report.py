"""Turn a suite's result file into the README block: settings, table, sweeps, ablation, the
targets and the evidence checked against the numbers, and two plots.

    python benchmarks/report.py --suite cpu-long [--readme README.md] [--docs docs]

Reads ``benchmarks/results/<suite>.json`` (written by ``compare.py``), replaces the README block
between ``<!-- bench:<suite> -->`` and ``<!-- /bench:<suite> -->`` with what it renders, and
writes ``docs/<suite>_val_ppl.png`` (validation perplexity against tokens, every contender at its
best setting) and ``docs/<suite>_memory_vs_ppl.png`` (memory against perplexity).

Where a contender was run with several seeds, its perplexity is shown as the mean with the
min–max range, and comparisons use the mean; a claim counts as decided only when the two
ranges do not overlap.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, replace_readme_block, suite_speed_name  # noqa: E402
from plan import ratio_step, round_setting, run_score, split_neighbours  # noqa: E402
from suites import CONTENDERS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "adamw"
FULL_RANK = (BASELINE, "adamw-split", "spam", "stable_spam", "adamw8bit", "adam-mini")
"""Full-rank training (every weight trained in full, any optimizer): plain AdamW, the fair baseline
with the matrix/dense lr split (issue 21), the spike-aware and the compressed-state Adams. The
"full-rank training remains best" claim compares the best of these with the best of the rest
(low-rank factors, projected gradients)."""
RESET_REMEDIES = {
    "low_rank_restarts-first": "m only (v kept)",
    "low_rank_restarts-rotate": "m only (v rotated)",
    "low_rank_restarts-warmup": "both + 10-step warm-up",
}
"""The ablation's remedies for the sign(g)-sized first update after a full reset, by what their reset does."""


def _mib(value: float) -> str:
    return f"{value / 2**20:,.1f}"


def _ratio(value: float, base: float | None) -> str:
    return f" ({value / base:.2f}×)" if base else ""


def completed(combined: dict) -> dict[str, dict]:
    """The suite's contenders with a finished best run, by name (all-diverged ones left out)."""
    return {name: r for name, r in combined["results"].items() if not r.get("failed")}


def standing(combined: dict) -> dict[str, dict]:
    """:func:`completed`, plus each contender whose search is still running at its best run so
    far (marked ``searching``: the table and the claims say so, and no claim about it is decided)."""
    rows = completed(combined)
    for name, entry in (combined.get("incomplete") or {}).items():
        if entry.get("best_so_far"):
            rows[name] = {**entry["best_so_far"], "sweep": entry["sweep"], "searching": True}
    return rows


def _name(record: dict) -> str:
    return f"`{record['contender']}`" + (" (search running)" if record.get("searching") else "")


def ppl(record: dict) -> float:
    """The perplexity comparisons use: the mean over seeds where there are several."""
    seeds = record.get("over_seeds") or {}
    return seeds["mean"] if len(seeds.get("val_ppl", [])) > 1 and "mean" in seeds else record["val_ppl"]


def spread(record: dict) -> tuple[float, float]:
    """(min, max) over seeds, or the single value twice."""
    seeds = record.get("over_seeds") or {}
    if len(seeds.get("val_ppl", [])) > 1 and "min" in seeds:
        return seeds["min"], seeds["max"]
    return record["val_ppl"], record["val_ppl"]


def ppl_text(record: dict) -> str:
    low, high = spread(record)
    return f"{ppl(record):.2f}" + (f" ({low:.2f}–{high:.2f})" if high > low else "")


def _has_ratio(results: dict[str, dict]) -> bool:
    return any(r.get("matrix_lr_ratio") not in (None, 1.0) for r in results.values()) or any(
        t.get("matrix_lr_ratio") not in (None, 1.0) for r in results.values() for t in r.get("sweep", []))


def table(combined: dict) -> str:
    """Markdown table of a suite, best first by (mean) validation perplexity."""
    results = standing(combined)
    base = results.get(BASELINE)
    ratio_column = _has_ratio(results)
    multi_seed = any(len((r.get("over_seeds") or {}).get("val_ppl", [])) > 1 for r in results.values())
    ppl_header = "val ppl, mean (min–max) over seeds" if multi_seed else "val ppl"
    header = ["contender", "kind", "lr"] + (["matrix lr ratio"] if ratio_column else []) + [
        ppl_header, "tokens/s", "optimizer state MiB", "params+grads+state MiB", "peak memory MiB"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---", "---"] + ["---:"] * (len(header) - 2)) + "|"]
    for r in sorted(results.values(), key=ppl):
        cells = [_name(r), r["kind"], f"{r['lr']:g}"]
        if ratio_column:
            cells.append("—" if r.get("matrix_lr_ratio") is None else f"{r['matrix_lr_ratio']:g}")
        cells += [
            f"{ppl_text(r)}{_ratio(ppl(r), base and ppl(base))}",
            f"{r['tokens_per_s']:,.0f}{_ratio(r['tokens_per_s'], base and base['tokens_per_s'])}",
            f"{_mib(r['optimizer_state_bytes'])}{_ratio(r['optimizer_state_bytes'], base and base['optimizer_state_bytes'])}",
            f"{_mib(r['model_state_bytes'])}{_ratio(r['model_state_bytes'], base and base['model_state_bytes'])}",
            f"{_mib(r['peak_memory_bytes'])}{_ratio(r['peak_memory_bytes'], base and base['peak_memory_bytes'])}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    failed = [name for name, r in combined["results"].items() if r.get("failed")]
    if failed:
        lines.append(f"\nDiverged at every setting tried: {', '.join(failed)}.")
    return "\n".join(lines)


def _point(t: dict) -> str:
    value = "diverged" if t.get("failed") or t.get("val_ppl") is None else f"{t['val_ppl']:.2f}"
    ratio = t.get("matrix_lr_ratio")
    where = f"{t['lr']:g}" + (f" ×{ratio:g}" if ratio not in (None, 1.0) else "")
    return f"{where} → {value}"


def sweep_lines(combined: dict) -> list[str]:
    """One line per swept contender: every (lr, matrix lr ratio) tried at the first seed."""
    sweeps = combined.get("sweeps", {})
    if not sweeps:
        return []
    lines = ["Sweeps (first seed; `lr ×k`: embeddings, head and norms at lr, hidden matrices (or their factors) at lr × k; "
             "the best of each is in the table):"]
    for name, tries in sweeps.items():
        shared = [t for t in tries if t.get("matrix_lr_ratio") in (None, 1.0)]
        split = sorted((t for t in tries if t not in shared), key=lambda t: (t["lr"] * t["matrix_lr_ratio"], t["lr"]))
        line = f"- `{name}`: " + ", ".join(_point(t) for t in sorted(shared, key=lambda t: t["lr"]))
        if split:
            line += "; split: " + ", ".join(_point(t) for t in split) + "; " + _split_check(tries, combined.get("settings") or {})
        lines.append(line + ".")
    return lines


def _split_check(tries: list[dict], settings: dict) -> str:
    """Whether the split search ended where it should (``plan._split_search``): at a best whose
    four neighbours (dense lr or matrix lr × or ÷ the search's step) all ran and none is better.
    A best without them is not yet an optimum (runs still to come, or the move budget ran out)."""
    step = ratio_step(tuple(settings.get("ratio_sweep") or (0.5, 2.0)))
    ran = {(round_setting(t["lr"]), round_setting(t.get("matrix_lr_ratio") or 1.0)) for t in tries}
    best = min(tries, key=run_score)
    missing = [p for p in split_neighbours(best["lr"], best.get("matrix_lr_ratio") or 1.0, step) if p not in ran]
    if not missing:
        return "the best is confirmed by its four neighbours"
    return (f"**the best is not confirmed**: {len(missing)} of its neighbours not run ("
            + ", ".join(f"{lr:g} ×{ratio:g}" for lr, ratio in missing) + ")")


def grid_table(combined: dict) -> list[str]:
    """For a suite that runs a fixed learning-rate grid (no extension), every contender at every
    multiple of its base lr: the final validation perplexity, or "diverged" (the run stopped on a
    non-finite state), and how many runs diverged at each multiple."""
    s = combined["settings"]
    factors = s.get("sweep_factors") or []
    if s.get("max_extend", 1) != 0 or len(factors) < 2:
        return []
    rows = {**combined.get("results", {}), **combined.get("incomplete", {})}
    lines = ["Every run of the grid (validation perplexity; lr as a multiple of each contender's base):", "",
             "| contender | base lr | " + " | ".join(f"×{f:g}" for f in factors) + " |",
             "|---|---:|" + "---:|" * len(factors)]
    diverged = [0] * len(factors)
    for name, record in rows.items():
        sweep = {round(t["lr"], 12): t for t in record.get("sweep", [])}
        base = min(sweep) / min(factors) if sweep else None
        cells = []
        for i, factor in enumerate(factors):
            t = sweep.get(round(base * factor, 12)) if base else None
            if t is None:
                cells.append("—")
            elif t.get("failed") or t.get("val_ppl") is None:
                cells.append("diverged")
                diverged[i] += 1
            else:
                cells.append(f"{t['val_ppl']:.2f}")
        lines.append(f"| `{name}` | {base:g} | " + " | ".join(cells) + " |" if base else f"| `{name}` | — |")
    lines.append("")
    lines.append("Diverged runs per multiple: " + ", ".join(f"×{f:g}: {n} of {len(rows)}" for f, n in zip(factors, diverged)) + ".")
    return lines


def _at_lr(base: dict, lr: float) -> dict | None:
    """``base``'s sweep run at ``lr`` (finished), if it made one."""
    return next((t for t in base.get("sweep", []) if round(t["lr"], 12) == round(lr, 12) and t.get("val_ppl") is not None), None)


def low_bit_pairs(combined: dict) -> list[str]:
    """The cost of 8-bit moments: each ``X-8bit`` / ``X_8bit`` contender against ``X`` at the same
    lr (``X``'s sweep run at the 8-bit run's lr), and ``X``'s best when that lies elsewhere."""
    results = completed(combined)
    lines = []
    for name, r in results.items():
        for suffix in ("-8bit", "_8bit"):
            if not (name.endswith(suffix) and name[: -len(suffix)] in results):
                continue
            base = results[name[: -len(suffix)]]
            same = _at_lr(base, r["lr"])
            reference = same["val_ppl"] if same else ppl(base)
            line = (f"- `{name}` vs `{base['contender']}` at lr {r['lr']:g}: val ppl {ppl(r):.2f} vs {reference:.2f} "
                    f"({(ppl(r) / reference - 1) * 100:+.1f} %), optimizer state {_mib(r['optimizer_state_bytes'])} vs "
                    f"{_mib(base['optimizer_state_bytes'])} MiB ({r['optimizer_state_bytes'] / base['optimizer_state_bytes']:.2f}×)")
            if same is None:
                line += f" (`{base['contender']}` was not run at this lr: its best, at {base['lr']:g}, is compared)"
            elif round(base["lr"], 12) != round(r["lr"], 12):
                line += f"; `{base['contender']}` at its best lr, {base['lr']:g}: {ppl(base):.2f}"
            lines.append(line + ".")
    return ["The cost of 8-bit moments (same preset):", *sorted(lines)] if lines else []


def bf16_pairs(combined: dict) -> list[str]:
    """bf16 storage against fp32: each ``X-bf16`` / ``X-bf16-nearest`` contender (``training.param_dtype:
    bf16`` and its ``bf16_rounding``) against the fp32 run of the same preset at the same lr
    (``X``, or ``X-fp32``)."""
    results = completed(combined)
    lines = []
    for name, r in results.items():
        rounding = (r.get("overrides") or {}).get("training.bf16_rounding")
        if (r.get("overrides") or {}).get("training.param_dtype") != "bf16" or rounding is None:
            continue  # bf16 autocast over fp32 storage (cpu-int4's adamw-bf16) is another comparison
        stem = name.removesuffix("-nearest").removesuffix("-bf16")
        base = results.get(f"{stem}-fp32") or results.get(stem)
        same = _at_lr(base, r["lr"]) if base else None
        if same is None:
            continue
        lines.append(f"- `{name}` ({rounding} rounding) vs `{base['contender']}` (fp32) at lr {r['lr']:g}: val ppl "
                     f"{ppl(r):.2f} vs {same['val_ppl']:.2f} ({(ppl(r) / same['val_ppl'] - 1) * 100:+.1f} %).")
    return ["bf16 storage against fp32 (same preset, same lr; speed: the step-cost table, measured quietly):",
            *sorted(lines)] if lines else []


def ablation_table(combined: dict) -> list[str]:
    """The benchmark paper's ablation at the base contender's best setting."""
    ablation = combined.get("ablation") or {}
    rows = {name: r for name, r in (ablation.get("rows") or {}).items() if r.get("complete") and not r.get("failed")}
    base = combined["results"].get(ablation.get("base") or "")
    if not rows or base is None:
        return []
    setting = f"lr {base['lr']:g}" + (f", matrix lr ratio {base['matrix_lr_ratio']:g}" if base.get("matrix_lr_ratio") else "")
    lines = [f"Ablation at `{ablation['base']}`'s best setting ({setting}):", "",
             "| variant | rank | refactorization | momentum reset | period | val ppl | vs `" + ablation["base"] + "` |",
             "|---|---:|:-:|:-:|---:|---:|---:|"]
    what = {
        ablation["base"]: ("", "", "—"),
        "low_rank_refactorize": ("✓", "", "200"),
        "low_rank_reset": ("", "✓", "200"),
        "low_rank_restarts": ("✓", "✓", "200"),
        "low_rank_restarts@100": ("✓", "✓", "100"),
        "low_rank_restarts@400": ("✓", "✓", "400"),
        **{name: ("✓", reset, "200") for name, reset in RESET_REMEDIES.items()},
    }
    suite_rank = combined["settings"]["rank"]
    for name, r in [(ablation["base"], base), *rows.items()]:
        refactor, reset, period = what.get(name, ("", "", "—"))  # a variant of the base in another respect (its rank)
        rank = dict(CONTENDERS[name].overrides).get("lowrank.rank", suite_rank) if name in CONTENDERS else suite_rank
        delta = (ppl(r) / ppl(base) - 1) * 100
        lines.append(f"| `{name}` | {rank} | {refactor} | {reset} | {period} | {ppl_text(r)} | {delta:+.1f} % |")
    return lines


def _seeds(record: dict) -> int:
    return len((record.get("over_seeds") or {}).get("val_ppl", [])) or 1


def compare_claim(a: dict, b: dict) -> str:
    """``holds`` when ``a`` is better than ``b`` with separated seed ranges, ``does not hold``
    when worse with separated ranges, otherwise ``not decided`` (also with a single seed, where
    the noise is unknown)."""
    if min(_seeds(a), _seeds(b)) < 2:
        direction = "ahead" if ppl(a) < ppl(b) else "behind"
        return f"not decided (one seed; {abs(ppl(a) / ppl(b) - 1) * 100:.1f} % {direction})"
    a_low, a_high = spread(a)
    b_low, b_high = spread(b)
    if a_high < b_low:
        return "holds"
    if a_low > b_high:
        return "does not hold"
    return "not decided (seed ranges overlap)"


def evidence(combined: dict) -> list[str]:
    """The seed papers' claims this suite can test, each judged from its own numbers."""
    results = standing(combined)
    lines = []

    def name_ppl(name):
        r = results[name]
        return f"{_name(r)} {ppl_text(r)}"

    if {"low_rank", "low_rank_restarts"} <= results.keys():
        verdict = compare_claim(results["low_rank_restarts"], results["low_rank"])
        lines.append(f"- Refactorization + momentum reset beats plain low-rank (arXiv 2505.22922): **{verdict}** — "
                     f"{name_ppl('low_rank_restarts')} vs {name_ppl('low_rank')}.")
    peers = [p for p in ("galore-torch", "fira") if p in results]
    if "low_rank_restarts" in results and peers:
        ours = results["low_rank_restarts"]
        parts = []
        for peer in peers:
            verdict = compare_claim(ours, results[peer])
            memory = ours["model_state_bytes"] < results[peer]["model_state_bytes"]
            parts.append(f"vs {_name(results[peer])} {ppl_text(results[peer])}: **{verdict}**, at "
                         f"{'less' if memory else 'more'} memory ({_mib(ours['model_state_bytes'])} vs "
                         f"{_mib(results[peer]['model_state_bytes'])} MiB)")
        lines.append(f"- `low_rank_restarts` beats GaLore and Fira at less memory: " + "; ".join(parts) + ".")
    full_rank = [n for n in FULL_RANK if n in results]
    others = {n: r for n, r in results.items() if n not in FULL_RANK}
    if full_rank and others:
        best_full = min(full_rank, key=lambda n: ppl(results[n]))
        best_other = min(others, key=lambda n: ppl(others[n]))
        verdict = compare_claim(results[best_full], others[best_other])
        lines.append(f"- Full-rank training remains best: **{verdict}** — {name_ppl(best_full)}"
                     + (f" (the better of {', '.join(f'`{n}`' for n in full_rank)})" if len(full_rank) > 1 else "")
                     + f" vs the best other, {name_ppl(best_other)}.")
    for name in ("spam", "stable_spam"):
        if name in results and BASELINE in results:
            lines.append(f"- {name} beats AdamW: **{compare_claim(results[name], results[BASELINE])}** — "
                         f"{name_ppl(name)} vs {name_ppl(BASELINE)}.")
    lines += remedy_lines(combined)
    return ["What these numbers say about the seed papers' claims:", *lines] if lines else []


def remedy_lines(combined: dict) -> list[str]:
    """Each reset remedy of the ablation against ``low_rank_restarts`` at the same setting."""
    rows = {name: r for name, r in ((combined.get("ablation") or {}).get("rows") or {}).items()
            if r.get("complete") and not r.get("failed")}
    reference = rows.get("low_rank_restarts")
    if reference is None:
        return []
    return [f"- Reset remedy `{name}` ({RESET_REMEDIES[name]}) beats the full reset: "
            f"**{compare_claim(rows[name], reference)}** — {ppl_text(rows[name])} vs {ppl_text(reference)}."
            for name in RESET_REMEDIES if name in rows]


def preset_lines(combined: dict) -> list[str]:
    """Each of our presets that ran as written (a contender of the same name, no overrides) and was
    swept, against its best setting in this suite: issue 21 asks the presets' lr and ratio to
    follow the evidence, and one that does not is named here with both numbers."""
    from lowrank.methods import load_method

    def same(a: dict, b: dict) -> bool:
        return all(abs((a[k] or 1.0) / (b[k] or 1.0) - 1) < 1e-6 for k in ("lr", "matrix_lr_ratio"))

    lines = []
    for name, r in sorted(completed(combined).items()):
        contender = CONTENDERS.get(name)
        if contender is None or contender.peer is not None or contender.preset != name or contender.overrides \
                or not swept(combined, name):
            continue
        optimizer = load_method(name).optimizer
        preset = {"lr": optimizer.lr, "matrix_lr_ratio": optimizer.matrix_lr_ratio if r.get("matrix_lr_ratio") else None}
        run = next((t for t in combined["sweeps"][name] if same(t, preset)), None)
        if run is None:
            lines.append(f"- `{name}`: the preset ({_point(preset).split(' → ')[0]}) was not run here; this suite's best: "
                         f"{_point(r)}.")
            continue
        preset_text = _point({**preset, "val_ppl": run["val_ppl"]})
        if same(r, preset):
            lines.append(f"- `{name}`: the preset ({preset_text}) is the best setting here.")
        else:
            lines.append(f"- `{name}`: **the preset ({preset_text}) is not the best setting here**: {_point(r)}.")
    return ["Our presets against this suite's best settings (first seed):", *lines] if lines else []


def targets(combined: dict) -> list[str]:
    """The suite's targets checked against its own numbers (issue #6), one bullet each.

    "Our best memory-efficient method" is our contender with the lowest perplexity among those
    that are not full-rank (:data:`FULL_RANK`) and whose parameters + gradients + optimizer state
    are below full-rank AdamW's. The perplexity target is judged against the better of plain
    AdamW and AdamW with the matrix/dense split (the fair full-rank baseline, issue 21).
    """
    results = standing(combined)
    base = results.get(BASELINE)
    ours = [r for r in results.values() if r["kind"] == "ours" and r["contender"] not in FULL_RANK
            and (base is None or r["model_state_bytes"] < base["model_state_bytes"])]
    if not ours:
        return []
    best = min(ours, key=ppl)
    mark = {True: "met", False: "**not met**"}
    lines = [f"Our best memory-efficient contender here is {_name(best)} "
             f"(val ppl {ppl(best):.2f}, {_mib(best['model_state_bytes'])} MiB parameters + gradients + state)."]
    # a perplexity target is judged only against a peer that had its lr swept as ours had
    unswept = [name for name in ("galore-torch", "fira", BASELINE) if name in results and not swept(combined, name)]
    for peer in ("galore-torch", "fira"):
        if peer in results and peer not in unswept:
            r = results[peer]
            lines.append(f"- vs {_name(r)}: perplexity {ppl(best):.2f} vs {ppl(r):.2f} "
                         f"({mark[ppl(best) <= ppl(r)]}), model-state memory {_mib(best['model_state_bytes'])} vs "
                         f"{_mib(r['model_state_bytes'])} MiB ({mark[best['model_state_bytes'] < r['model_state_bytes']]}).")
    if base is not None:
        if BASELINE not in unswept:
            full = min((results[n] for n in (BASELINE, "adamw-split") if n in results), key=ppl)
            ratio = ppl(best) / ppl(full)
            lines.append(f"- within 10 % of full-rank AdamW's perplexity ({_name(full)}, {ppl(full):.2f}): "
                         f"{ratio:.3f}× ({mark[ratio <= 1.10]}).")
        for name in ("low_rank", "low_rank_restarts"):
            if name in results:
                speed = results[name]["tokens_per_s"] / base["tokens_per_s"]
                lines.append(f"- `{name}` tokens/s vs AdamW: {speed:.2f}× ({mark[speed > 1.0]}; the target is set for "
                             f"the 60M shape and above, this suite's model is {combined['settings']['model']}).")
    if unswept:
        lines.append(f"- perplexity against {', '.join(f'`{n}`' for n in unswept)}: not judged, each ran at one lr (its "
                     "published value) and a comparison with a tuned contender would not be fair; `cpu-long` sweeps every one.")
    return lines


def swept(combined: dict, name: str) -> bool:
    """Whether ``name`` ran at more than one learning rate in this suite."""
    return len({t["lr"] for t in (combined.get("sweeps") or {}).get(name, [])}) > 1


def with_quiet_speed(combined: dict, speed: dict | None) -> dict:
    """``combined`` with each result's tokens/s replaced by its quiet figure from
    ``bench_suite_speed.py`` (``speed``), where that measured it; ``speed_source`` records which.
    The suite's own runs share the machine (side by side, for hours), so their figure is the
    fallback only."""
    if not speed:
        return combined
    quiet = speed["contenders"]
    results = {}
    for name, r in combined["results"].items():
        results[name] = {**r, "tokens_per_s": quiet[name]["tokens_per_s"], "quiet_speed": True} if name in quiet else r
    return {**combined, "results": results, "speed": {k: speed[k] for k in ("steps", "rounds")}}


def _speed_text(combined: dict) -> str:
    speed = combined.get("speed")
    if speed is None:
        return "tokens/s from the runs themselves (they shared the machine: compare within this table loosely)"
    busy = [n for n, r in completed(combined).items() if not r.get("quiet_speed")]
    return (f"tokens/s measured quietly (`bench_suite_speed.py`: one run at a time, median over {speed['rounds']} "
            f"interleaved rounds of {speed['steps']}-step runs)"
            + (f", except {', '.join(f'`{n}`' for n in busy)} (from its own runs)" if busy else ""))


def settings_line(combined: dict) -> str:
    s, machine = combined["settings"], combined["machine"]
    device = machine.get("gpu") or f"{machine['cpu']} ({machine['cpu_count']} cores)"
    runs = f"{machine['jobs']} runs side by side, {machine['threads_per_run']} thread each" if "jobs" in machine else \
        f"{machine['torch_threads']} threads"
    seeds = s.get("seeds", [s["seed"]])
    seed_text = f"seeds {', '.join(map(str, seeds))} (sweeps at seed {seeds[0]})" if len(seeds) > 1 else f"seed {s['seed']}"
    state = "" if combined.get("complete", True) else f" **Incomplete: {len(combined['pending'])} runs still to run.**"
    return (
        f"{s['note']}; {s['tokens_per_contender']:,} tokens each ({s['steps']} steps of {s['batch_size']}×{s['seq_len']}), "
        f"{seed_text}, rank {s['rank']}, every periodic event every {s['cycle']} steps, {s['precision']} on {device}, "
        f"{runs}, torch {machine['torch']}; {combined['wall_seconds'] / 60:.0f} min of runs in all; {_speed_text(combined)}."
        f"{state}"
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
    for i, (name, r) in enumerate(sorted(results.items(), key=lambda kv: ppl(kv[1]))):
        curve = r["val_curve"]
        style = "-" if r["kind"] == "ours" else "--"
        ax.plot([p["tokens"] for p in curve], [p["val_ppl"] for p in curve], style, marker="o", markersize=3,
                color=colors[i % len(colors)], label=f"{name} ({r['val_ppl']:.1f})")
    ax.set_yscale("log")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation perplexity (log scale)")
    ax.set_title(f"{suite}: validation perplexity at each best setting (solid: lowrank presets, dashed: peers)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    paths.append(docs / f"{suite}_val_ppl.png")
    fig.savefig(paths[-1])
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    for i, (name, r) in enumerate(sorted(results.items(), key=lambda kv: ppl(kv[1]))):
        marker = "o" if r["kind"] == "ours" else "s"
        low, high = spread(r)
        x = r["model_state_bytes"] / 2**20
        ax.errorbar(x, ppl(r), yerr=[[ppl(r) - low], [high - ppl(r)]], color=colors[i % len(colors)], marker=marker,
                    markersize=7, capsize=3)
        ax.annotate(name, (x, ppl(r)), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel("parameters + gradients + optimizer state (MiB)")
    ax.set_ylabel("validation perplexity (bars: min–max over seeds)")
    ax.set_title(f"{suite}: memory vs perplexity (lower left is better; circles: ours, squares: peers)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(docs / f"{suite}_memory_vs_ppl.png")
    fig.savefig(paths[-1])
    plt.close(fig)
    return paths


def render_block(combined: dict, plots: list[Path]) -> str:
    """The README block of a suite: settings, table, sweeps, ablation, targets, evidence, plots."""
    grid = grid_table(combined)
    sections = [[settings_line(combined)], [table(combined)], grid or sweep_lines(combined), low_bit_pairs(combined), bf16_pairs(combined),
                ablation_table(combined), targets(combined), evidence(combined), preset_lines(combined),
                [f"![validation perplexity against tokens]({plots[0]})", f"![memory against perplexity]({plots[1]})"]]
    return "\n\n".join("\n".join(section) for section in sections if section)


def update_readme(readme: Path, suite: str, block: str) -> bool:
    """Replace the marked block for ``suite``; returns False when the README has no markers."""
    return replace_readme_block(readme, f"<!-- bench:{suite} -->", f"<!-- /bench:{suite} -->", block)


def load_combined(results: Path, suite: str) -> dict:
    """A suite's combined results as the README renders them: with the quiet tokens/s of
    ``bench_suite_speed.py`` where that file exists."""
    combined = json.loads((results / f"{suite}.json").read_text())
    speed_path = results / f"{suite_speed_name(suite)}.json"
    return with_quiet_speed(combined, json.loads(speed_path.read_text()) if speed_path.is_file() else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default="cpu-small")
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--readme", default=str(ROOT / "README.md"))
    parser.add_argument("--docs", default=str(ROOT / "docs"))
    args = parser.parse_args()
    combined = load_combined(Path(args.results), args.suite)
    paths = plot(combined, Path(args.docs))
    block = render_block(combined, [p.relative_to(ROOT) if p.is_relative_to(ROOT) else p for p in paths])
    print(block)
    if update_readme(Path(args.readme), args.suite, block):
        print(f"\nupdated the {args.suite} block of {args.readme}")


if __name__ == "__main__":
    main()
