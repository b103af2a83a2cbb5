"""``metrics.jsonl`` (and TensorBoard when it is installed): one record per logged step, event
and evaluation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["MetricsLogger", "read_records"]


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics file; a line that does not parse (the partial last line a kill
    in the middle of a write leaves) is dropped."""
    records = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                records.append(record)
    return records


class MetricsLogger:
    """Appends records to ``path``. On resume, records from beyond the checkpoint's step (written
    before a crash) and any partial line are dropped, so the file reads as if the run had never
    stopped; :attr:`history` holds the records that were kept."""

    def __init__(self, path: Path, resume_step: int, tensorboard: Path | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.history = [r for r in read_records(path) if r["step"] <= resume_step] if resume_step else []
        path.write_text("".join(json.dumps(r) + "\n" for r in self.history))
        self.handle = open(path, "a")
        self.board = None
        if tensorboard is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.board = SummaryWriter(str(tensorboard))
            except ImportError:
                pass

    def log(self, record: dict[str, Any]) -> None:
        self.handle.write(json.dumps(record) + "\n")
        self.handle.flush()
        if self.board is not None:
            for key, value in record.items():
                if key not in ("step", "event") and isinstance(value, (int, float)):
                    self.board.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self.handle.close()
        if self.board is not None:
            self.board.close()
