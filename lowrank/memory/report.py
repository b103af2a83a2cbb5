"""Reports of memory estimates and measurements: an aligned terminal table, JSON, a PNG chart."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .estimate import MemoryEstimate
from .measure import Measurement

__all__ = ["CATEGORIES", "format_table", "format_comparison", "to_json", "dumps", "plot"]

SCHEMA = "lowrank.memory/1"
BASELINE = "full_rank"
GIB, MIB = 2**30, 2**20
# (label, attribute) of the stacked categories, bottom to top; the last is what comes on top of the
# model state at the peak: the activations or the optimizer step's working set, the larger.
CATEGORIES = (("weights", "weights"), ("gradients", "gradients"), ("optimizer", "optimizer"),
              ("activations or step temporaries", "transient"))


def _optimizer(e: MemoryEstimate | Measurement) -> int:
    return e.optimizer_state + e.optimizer_extra


def _values(e: MemoryEstimate) -> dict[str, int]:
    return {"weights": e.weights, "gradients": e.gradients, "optimizer": _optimizer(e), "transient": e.total - e.model_state}


def _unit(estimates: Sequence[MemoryEstimate]) -> tuple[str, int]:
    return ("GiB", GIB) if max(e.total for e in estimates) >= GIB else ("MiB", MIB)


def _count(n: int) -> str:
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= size:
            return f"{n / size:.3g}{suffix}"
    return str(n)


def _on(flag: bool) -> str:
    return "on" if flag else "off"


def describe(e: MemoryEstimate) -> str:
    return (
        f"{e.model} · weights {e.weight_dtype} · Adam moments {e.state_dtype or 'in the weight dtype'} · "
        f"batch {e.batch_size} × {e.seq_len} tokens · activation checkpointing {_on(e.checkpointing)} · "
        f"layerwise step {_on(e.layerwise)}"
    )


def _align(rows: list[list[str]], left: int = 1) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [cell.ljust(w) if i < left else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    rule = "─" * len(lines[0])
    return "\n".join([lines[0], rule, *lines[1:]])


def format_table(estimates: Sequence[MemoryEstimate], baseline: MemoryEstimate) -> str:
    """Methods as rows, memory categories as columns (GiB, or MiB for small models), and each
    total as a ratio to full-rank AdamW under the same settings."""
    unit, scale = _unit([*estimates, baseline])
    rows = [["method", "rank", "trainable", "weights", "grads", "optimizer", "activations", "step", "total", "vs full-rank"]]
    for e in estimates:
        rows.append([
            e.method,
            "-" if e.rank is None else str(e.rank),
            _count(e.trainable_parameters),
            *(f"{value / scale:.2f}" for value in (e.weights, e.gradients, _optimizer(e), e.activations)),
            "-" if e.step_working_set is None else f"{e.step_working_set / scale:.2f}",
            f"{e.total / scale:.2f}",
            f"{e.total / baseline.total:.2f}×",
        ])
    lines = [f"Estimated training memory ({unit}): {describe(baseline)}", "", _align(rows)]
    notes = sorted({f"{e.method}: {note}" for e in estimates for note in e.notes})
    lines += ["", "optimizer = Adam state (+ sparse-momentum index cache); activations = LLaMA-block estimate "
              "(lowrank.memory.activations); step = the optimizer step's own temporaries at their largest "
              "(lowrank.optim.working_set; '-': a peer's, not modelled); total = the peak, weights + optimizer + the larger "
              "of activations (early in backward) and grads + step (in the optimizer step; with --layerwise-step "
              "beside the layers' activations); allocator caching and kernel workspaces excluded"]
    lines += [f"note — {note}" for note in notes]
    return "\n".join(lines)


def _relative(estimated: int | None, measured: int | None) -> float | None:
    if estimated is None or measured is None or measured == 0:
        return None
    return (estimated - measured) / measured


def kept_activations(estimate: MemoryEstimate) -> int:
    """The estimate's activations saved from forward to backward, as measured by saved-tensor hooks:
    with checkpointing, without the one layer recomputed at a time in backward (its tensors are
    saved through the checkpoint's own hooks; :mod:`lowrank.memory.measure`)."""
    detail = estimate.activation_detail
    return detail["saved"] - (detail["per_layer"] if estimate.checkpointing else 0)


def comparison_rows(estimate: MemoryEstimate, measured: Measurement) -> list[tuple[str, int | None, int | None]]:
    """``(key, estimated, measured)`` per compared category; keys are the JSON names."""
    return [
        ("weights", estimate.weights, measured.weights),
        ("gradients", estimate.gradients, measured.gradients),
        ("optimizer_state", estimate.optimizer_state, measured.optimizer_state),
        ("optimizer_extra", estimate.optimizer_extra, measured.optimizer_extra),
        ("saved_activations", kept_activations(estimate), measured.activations),
        ("total_vs_peak", estimate.total, measured.peak),
    ]


def format_comparison(pairs: Sequence[tuple[MemoryEstimate, Measurement]]) -> str:
    """Estimate and measurement side by side, per method and category, with ``est/meas − 1``."""
    unit, scale = _unit([e for e, _ in pairs])
    rows = [["method", "category", f"estimated {unit}", f"measured {unit}", "difference"]]
    for e, m in pairs:
        for i, (name, est, meas) in enumerate(comparison_rows(e, m)):
            rel = _relative(est, meas)
            rows.append([
                e.method if i == 0 else "",
                name.replace("_", " "),
                f"{est / scale:.4f}",
                "-" if meas is None else f"{meas / scale:.4f}",
                "-" if rel is None else f"{rel:+.2%}",
            ])
    first = pairs[0][1]
    lines = [f"Estimate vs {first.steps} measured step(s) on {first.device} (peak: {first.peak_kind})", "", _align(rows, left=2)]
    if first.peak_forward_backward is not None:
        split = ", ".join(f"{e.method} {m.peak_forward_backward / scale:.1f} / {m.peak_optimizer_step / scale:.1f}" for e, m in pairs)
        # with --layerwise-step the optimizer's updates run inside backward (lowrank.memory.measure)
        layerwise = any(e.layerwise for e, _ in pairs)
        where = "in the optimizer's updates (inside backward with --layerwise-step)" if layerwise else "in optimizer.step"
        lines += ["", f"peak in forward+backward / {where} ({unit}): {split}"]
    if first.peak_rss is not None:
        rss = ", ".join(f"{e.method} {m.peak_rss / scale:.1f}" for e, m in pairs)
        lines += [f"process peak RSS ({unit}, cumulative over the whole process): {rss}"]
    lines += ["", "the peak also holds transients the estimate leaves out: the optimizer step's temporaries, "
              "the fp32 logits copy and its gradient, kernel workspaces"]
    return "\n".join(lines)


def to_json(estimates: Sequence[MemoryEstimate], baseline: MemoryEstimate, *, model_info: dict[str, Any],
            requested_rank: int | None, measurements: Sequence[tuple[MemoryEstimate, Measurement]] = ()) -> dict[str, Any]:
    """A JSON-ready dict (bytes everywhere); the same inputs always give the same output."""
    data: dict[str, Any] = {
        "schema": SCHEMA,
        "units": "bytes",
        "model": model_info,
        "settings": {
            "rank": requested_rank,
            "weight_dtype": baseline.weight_dtype,
            "state_dtype": baseline.state_dtype,
            "batch_size": baseline.batch_size,
            "seq_len": baseline.seq_len,
            "checkpointing": baseline.checkpointing,
            "layerwise": baseline.layerwise,
        },
        "baseline": {"method": baseline.method, "total": baseline.total},
        "estimates": [{**e.to_dict(), "ratio_to_full_rank": round(e.total / baseline.total, 4)} for e in estimates],
    }
    if measurements:
        data["measurements"] = [
            {
                "method": e.method,
                **m.to_dict(),
                "relative_difference": {name: _round(_relative(est, meas)) for name, est, meas in comparison_rows(e, m)},
            }
            for e, m in measurements
        ]
    return data


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def dumps(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2) + "\n"


def plot(estimates: Sequence[MemoryEstimate], baseline: MemoryEstimate, path: str | Path, *, title: str | None = None) -> Path:
    """A horizontal stacked bar per method (weights, gradients, optimizer, activations or the step's
    temporaries), its total
    and ratio to full-rank AdamW at the bar's end, written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    unit, scale = _unit([*estimates, baseline])
    # Okabe–Ito colours: distinguishable with the common colour-vision deficiencies.
    colours = {"weights": "#0072B2", "gradients": "#56B4E9", "optimizer": "#E69F00", "transient": "#009E73"}
    fig, ax = plt.subplots(figsize=(9.5, 1.9 + 0.42 * len(estimates)))
    ys = list(range(len(estimates)))[::-1]
    left = [0.0] * len(estimates)
    for label, key in CATEGORIES:
        widths = [_values(e)[key] / scale for e in estimates]
        ax.barh(ys, widths, left=left, color=colours[key], label=label, height=0.68, edgecolor="white", linewidth=0.6)
        left = [a + b for a, b in zip(left, widths)]
    largest = max(left)
    for y, e, end in zip(ys, estimates, left):
        ax.text(end + largest * 0.01, y, f"{e.total / scale:.1f} {unit}  ({e.total / baseline.total:.2f}×)", va="center", fontsize=9)
    ax.set_yticks(ys, [e.method + ("" if e.rank is None else f" (r={e.rank})") for e in estimates], fontsize=10)
    ax.set_xlim(0, largest * 1.22)
    ax.set_xlabel(unit)
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    subtitle = (f"weights {baseline.weight_dtype}, Adam moments {baseline.state_dtype or 'in the weight dtype'}, "
                f"batch {baseline.batch_size} × {baseline.seq_len} tokens, activation checkpointing "
                f"{_on(baseline.checkpointing)}, layerwise step {_on(baseline.layerwise)}")
    ax.set_title(title or f"Estimated training memory — {baseline.model}\n{subtitle}", fontsize=10, loc="left", pad=26)
    ax.legend(ncol=4, loc="lower left", bbox_to_anchor=(0.0, 1.0), frameon=False, fontsize=9, borderaxespad=0.2)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
