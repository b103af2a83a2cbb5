"""Encoding and packing, shared by the finite and the streaming paths.

Packing: each document's tokens, then the EOS id, concatenated into one stream
(:func:`encode_documents`) and cut into ``seq_len`` chunks (the final partial chunk is dropped):
no padding. :func:`pack` cuts a whole flat stream at once, :class:`Packer` the same stream piece
by piece.

Validation selection (:func:`valid_tensor`): of a finite corpus, ``max_valid_tokens // seq_len``
chunks spread evenly over the whole packed validation split (:func:`spread_chunk_indices`: one
chunk drawn from each of that many equal strata, from a fixed seed, so every run and every method
is evaluated on the same tokens, and a split whose first file is one long page is not measured on
that page alone); of a stream, its first ``max_valid_tokens`` tokens (a hub validation split comes
shuffled). The description it returns says which tokens were used.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable

import numpy as np
import torch

from ..errors import UsageError

VALID_SELECTION_SEED = 0
"""Seed of the validation chunk draw: fixed, not the run's seed, so runs with different seeds are
evaluated on the same tokens."""


def token_dtype(vocab: int) -> np.dtype:
    """The dtype of a token array for a vocabulary of ``vocab`` ids."""
    return np.dtype(np.uint16) if vocab <= 1 << 16 else np.dtype(np.int32)


def encode_documents(tokenizer, texts: list[str], dtype: np.dtype | None = None) -> np.ndarray:
    """Batch-encode ``texts`` (no special tokens added) and return their ids as one flat array,
    each document followed by the eos id: the packing stream."""
    backend = tokenizer.backend_tokenizer
    eos = tokenizer.eos_token_id
    dtype = dtype or token_dtype(len(tokenizer))
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    encodings = encode(texts, add_special_tokens=False)
    total = sum(len(e.ids) for e in encodings) + len(encodings)
    stream = itertools.chain.from_iterable(itertools.chain(e.ids, (eos,)) for e in encodings)
    return np.fromiter(stream, dtype=dtype, count=total)


class Packer:
    """Concatenates token streams and hands out ``seq_len`` chunks; keeps the leftover tokens.

    Chunks come out exactly as ``flat[i * seq_len:(i + 1) * seq_len]`` of the whole concatenated
    stream would: the finite path packs the flat array at once, the streaming path feeds this
    packer piece by piece."""

    def __init__(self, seq_len: int, leftover: Iterable[int] = ()):
        self.seq_len = seq_len
        self._buffer = np.asarray(list(leftover), dtype=np.int64)

    def __len__(self) -> int:
        return len(self._buffer)

    def add(self, tokens: np.ndarray) -> None:
        self._buffer = np.concatenate([self._buffer, np.asarray(tokens, dtype=np.int64)])

    def take(self, num_chunks: int) -> np.ndarray | None:
        """``(num_chunks, seq_len)`` int64, or ``None`` if the buffer does not hold that many yet."""
        need = num_chunks * self.seq_len
        if len(self._buffer) < need:
            return None
        out, self._buffer = self._buffer[:need], self._buffer[need:]
        return out.reshape(num_chunks, self.seq_len)

    def leftover(self) -> list[int]:
        return self._buffer.tolist()


def pack(flat: np.ndarray, seq_len: int, max_chunks: int | None = None) -> torch.Tensor:
    """The ``(n, seq_len)`` LongTensor of full chunks of a flat token stream (at most ``max_chunks``)."""
    n = len(flat) // seq_len
    if max_chunks is not None:
        n = min(n, max_chunks)
    return torch.from_numpy(np.asarray(flat[: n * seq_len], dtype=np.int64).reshape(n, seq_len))


def spread_chunk_indices(total: int, count: int | None, seed: int = VALID_SELECTION_SEED) -> np.ndarray:
    """Sorted indices of ``count`` of ``total`` chunks, spread evenly over all of them.

    Stratified sampling: the chunks are cut into ``count`` consecutive strata of (almost) equal size
    (``[floor(i·total/count), floor((i+1)·total/count))``) and one chunk is drawn uniformly from
    each with ``numpy.random.default_rng(seed)``. Every part of the split is represented in
    proportion to its length, unlike a prefix, and the draw is a pure function of its arguments.
    ``count`` of ``None`` or ``>= total`` keeps every chunk.
    """
    if count is None or count >= total:
        return np.arange(total)
    edges = (np.arange(count + 1, dtype=np.int64) * total) // count
    widths = edges[1:] - edges[:-1]
    offsets = np.floor(np.random.default_rng(seed).random(count) * widths).astype(np.int64)
    return edges[:-1] + offsets


def valid_tensor(flat: np.ndarray, seq_len: int, max_valid_tokens: int | None, name: str,
                 spread: bool) -> tuple[torch.Tensor, dict]:
    """The validation chunks and a description of which tokens they are. ``spread``: draw them
    over the whole split (:func:`spread_chunk_indices`); otherwise take the prefix (a stream, which
    was read only up to ``max_valid_tokens``)."""
    total = len(flat) // seq_len
    if total == 0:
        raise UsageError(
            f"{name}: the validation split has {len(flat)} tokens, less than one --seq-len {seq_len} chunk; "
            "use more data, a folder with train*/valid* files, or a shorter --seq-len"
        )
    count = None if max_valid_tokens is None else max_valid_tokens // seq_len
    if spread:
        indices = spread_chunk_indices(total, count)
        rule = (f"one {seq_len}-token chunk drawn from each of {len(indices)} equal strata of the "
                f"{total} chunks of the packed validation split (seed {VALID_SELECTION_SEED})")
    else:
        indices = np.arange(min(total, count or total))
        rule = f"the first {len(indices)} {seq_len}-token chunks of the validation stream"
    # Rows of a view of the (possibly memory-mapped) stream: only the chosen chunks are copied.
    rows = np.asarray(flat[: total * seq_len]).reshape(total, seq_len)[indices]
    valid = torch.from_numpy(rows.astype(np.int64))
    selection = {
        "rule": rule,
        "chunks": len(indices),
        "of_chunks": total,
        "tokens": len(indices) * seq_len,
        "first_chunk": int(indices[0]),
        "last_chunk": int(indices[-1]),
        "sha1": hashlib.sha1(valid.numpy().tobytes()).hexdigest(),
    }
    return valid, selection
