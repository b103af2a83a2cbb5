"""The floating dtypes a user may name (on the command line, in a preset, in an export), and the
one table that maps names to ``torch.dtype`` and back."""

from __future__ import annotations

import torch

from .errors import UsageError

__all__ = ["DTYPES", "parse_dtype", "dtype_name"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def parse_dtype(value: str | torch.dtype | None, what: str) -> torch.dtype | None:
    """``"bfloat16"`` / ``"bf16"`` / ``torch.bfloat16`` → ``torch.bfloat16``; ``None`` stays ``None``."""
    if value is None or isinstance(value, torch.dtype):
        return value
    name = _ALIASES.get(str(value), str(value))
    if name not in DTYPES:
        raise UsageError(f"{what} must be one of {', '.join(DTYPES)}, got {value!r}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype | None) -> str | None:
    """``torch.bfloat16`` → ``"bfloat16"`` (the keys of :data:`DTYPES`)."""
    return None if dtype is None else str(dtype).removeprefix("torch.")
