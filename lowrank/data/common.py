"""Constants and helpers shared by the modules of :mod:`lowrank.data`: the hash rule of the
validation split, the cache format version and the hub's offline switch."""

from __future__ import annotations

import hashlib
import os

VALID_MODULUS = 20
"""1 in this many documents (or builtin modules) goes to validation."""

FORMAT_VERSION = 1  # bump when the packed-array layout or the document rules change


def sha1_int(text: str) -> int:
    """The first 8 bytes of the text's SHA-1 as an integer: the hash of the split rules."""
    return int.from_bytes(hashlib.sha1(text.encode("utf-8", "surrogatepass")).digest()[:8], "big")


def is_valid_document(text: str) -> bool:
    """The hash rule for corpora without named splits: 1 document in 20 goes to validation."""
    return sha1_int(text) % VALID_MODULUS == 0


def hub_offline() -> bool:
    """Whether the Hugging Face hub is switched off (``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``)."""
    truthy = {"1", "ON", "YES", "TRUE"}
    if any(os.environ.get(v, "").upper() in truthy for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover - very old huggingface_hub
        return False
