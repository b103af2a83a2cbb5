"""Writing files so that a crash never leaves half of one: write a temporary file, flush it to
disk, rename it over the target (readers see the old file or the new one, never a mix)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["atomic_write_bytes", "fsync_file"]


def fsync_file(path: Path) -> None:
    """Flush ``path``'s bytes to the disk (before a rename makes them visible)."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``path`` through a temporary file and a rename: readers see the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    fsync_file(tmp)
    os.replace(tmp, path)
