"""``metrics.jsonl`` (and TensorBoard when it is installed): one record per logged step, event
and evaluation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["MetricsLogger"]


class MetricsLogger:
    """Appends records to ``path``. On resume, records from beyond the checkpoint's step (written
    before a crash) are dropped, so the file reads as if the run had never stopped."""

    def __init__(self, path: Path, resume_step: int, tensorboard: Path | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        if path.exists():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= resume_step] if resume_step else []
            path.write_text("".join(line + "\n" for line in kept))
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
