"""Loss-curve PNGs from a run's ``metrics.jsonl`` (matplotlib, no display needed)."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["plot_loss_curves", "read_metrics"]


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_loss_curves(metrics_path: str | Path, png_path: str | Path, *, title: str = "") -> Path:
    """Training loss (raw and smoothed) and validation loss against tokens, with restart
    events marked; written to ``png_path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [r for r in records if "loss" in r]
    valid = [r for r in records if "val_loss" in r]
    events = [r for r in records if "event" in r and r["event"] != "none"]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    if train:
        tokens = [r["tokens"] for r in train]
        losses = [r["loss"] for r in train]
        ax.plot(tokens, losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="train loss")
        smoothed, value = [], losses[0]
        for loss in losses:
            value = 0.9 * value + 0.1 * loss
            smoothed.append(value)
        ax.plot(tokens, smoothed, color="tab:blue", linewidth=1.6, label="train loss (EMA 0.9)")
    if valid:
        ax.plot([r["tokens"] for r in valid], [r["val_loss"] for r in valid], "o-", color="tab:red", label="validation loss")
    for i, record in enumerate(events):
        ax.axvline(record["tokens"], color="gray", linestyle=":", linewidth=0.8, label=f"restart ({record['event']})" if i == 0 else None)
    ax.set_xlabel("tokens")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png_path = Path(png_path)
    fig.savefig(png_path)
    plt.close(fig)
    return png_path
