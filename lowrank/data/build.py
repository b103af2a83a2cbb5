"""build_data: the one entry point, tying source, tokenizer, packing and loaders together.

A finite source (builtin, a local file or folder) is tokenized once and packed into token arrays
cached under ``cache_dir/data`` (``<fingerprint>-train.npy``, ``-valid.npy``, ``.json``) keyed by
the corpus files' names, sizes and modification times plus the tokenizer, so a resumed or second
run does not re-tokenize; its training split is read by a :class:`~.loaders.TrainLoader`.

A hub dataset ``owner/name[:config]`` is streamed with ``datasets.load_dataset(..., streaming=True)``
and split across DDP ranks with ``datasets.distributed.split_dataset_by_node`` (or, from Python,
a ``datasets.IterableDataset`` or ``IterableDatasetDict`` object is streamed the same way) by a
:class:`~.loaders.StreamingTrainLoader`. Its validation is the dataset's ``validation`` (or
``valid``) split if it has one, else the documents of the train stream with
``sha1(text) % 20 == 0``, which the train stream then filters out. (A held-out *prefix* does not
compose with ``split_dataset_by_node``: ``datasets`` divides a ``skip(n)`` among the shards, so each
rank would skip the wrong documents.) The validation tokens read are cached under
``cache_dir/data`` too.

Under ``torch.distributed`` with a ``cache_dir``, rank 0 builds the caches first and the other
ranks then read them.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import json
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..files import atomic_write_bytes
from ..errors import UsageError, first_line
from .common import FORMAT_VERSION, VALID_MODULUS, hub_offline, is_valid_document
from .loaders import StreamingTrainLoader, TrainLoader
from .packing import encode_documents, token_dtype, valid_tensor
from .sources import SUFFIX_LIST, FiniteSource, resolve_source, stream_row_text
from .tokenizer import EOT, get_tokenizer, tokenizer_fingerprint

_ENCODE_BATCH = 1024  # documents per batch-encode call
_DEFAULT_HUB_VALID_TOKENS = 1_000_000


@dataclass
class DataBundle:
    """What :func:`build_data` returns."""

    tokenizer: Any
    """A ``transformers.PreTrainedTokenizerFast`` with ``eos_token`` set; ``len(tokenizer)`` is the
    vocabulary size the model must use."""
    train: TrainLoader | StreamingTrainLoader
    """Never-ending iterator of ``(batch_size, seq_len)`` LongTensor batches for this rank."""
    valid: torch.Tensor
    """``(num_valid_chunks, seq_len)`` LongTensor, identical on every rank."""
    description: dict = field(default_factory=dict)
    """Source, documents / tokens per split, tokenizer source, vocabulary size: for logging."""


def _batched(items: Iterable, n: int) -> Iterator[list]:
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, n)):
        yield batch


def _atomic_save_array(path: Path, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array)
    atomic_write_bytes(path, buffer.getvalue())


@contextlib.contextmanager
def _rank_zero_first(rank: int, world_size: int, enabled: bool):
    """Under torch.distributed, let rank 0 fill the shared caches before the other ranks read them."""
    sync = (
        enabled
        and world_size > 1
        and torch.distributed.is_available()
        and torch.distributed.is_initialized()
    )
    if sync and rank != 0:
        torch.distributed.barrier()
    yield
    if sync and rank == 0:
        torch.distributed.barrier()


def _check_arguments(seq_len, batch_size, seed, vocab_size, rank, world_size, max_valid_tokens) -> None:
    def positive(value, option):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(f"{option} must be a positive integer, got {value!r}")

    positive(seq_len, "--seq-len")
    positive(batch_size, "the batch size")
    positive(world_size, "world_size")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UsageError(f"--seed must be a non-negative integer, got {seed!r}")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 258:
        raise UsageError(f"--vocab-size must be an integer >= 258 (256 bytes + {EOT} + merges), got {vocab_size!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise UsageError(f"rank must be in [0, world_size={world_size}), got {rank!r}")
    if max_valid_tokens is not None and (not isinstance(max_valid_tokens, int) or max_valid_tokens < seq_len):
        raise UsageError(
            f"max_valid_tokens must be None or at least --seq-len ({seq_len}), got {max_valid_tokens!r}"
        )


def _tokenize_finite(source: FiniteSource, tok, cache_dir: Path | None) -> tuple[dict, dict]:
    """Packed token streams of both splits plus their counts, from the cache when possible."""
    key = json.dumps([FORMAT_VERSION, source.fingerprint(), tokenizer_fingerprint(tok)])
    fingerprint = hashlib.sha1(key.encode()).hexdigest()[:16]
    folder = cache_dir / "data" if cache_dir is not None else None
    if folder is not None:
        meta_file = folder / f"{fingerprint}.json"
        files = {split: folder / f"{fingerprint}-{split}.npy" for split in ("train", "valid")}
        if meta_file.is_file() and all(f.is_file() for f in files.values()):
            with contextlib.suppress(ValueError, OSError):
                arrays = {split: np.load(f, mmap_mode="r") for split, f in files.items()}
                meta = json.loads(meta_file.read_text())
                return arrays, {**meta, "cache": f"hit ({meta_file.name})"}
    dtype = token_dtype(len(tok))
    start = time.perf_counter()
    arrays, meta = {}, {}
    for split in ("train", "valid"):
        parts, documents = [], 0
        for texts in _batched(source.iter_docs(split), _ENCODE_BATCH):
            documents += len(texts)
            parts.append(encode_documents(tok, texts, dtype))
        if documents == 0:
            which = "training" if split == "train" else "validation"
            raise UsageError(
                f"--data {source.name}: the {which} split holds no text ({source.split_rule}); "
                "point --data at text data" + ("" if split == "train" else " with more documents or a valid* file")
            )
        arrays[split] = np.concatenate(parts)
        meta[f"{split}_documents"] = documents
        meta[f"{split}_tokens"] = int(len(arrays[split]))
    meta["tokenize_seconds"] = round(time.perf_counter() - start, 2)
    if folder is not None:
        for split, array in arrays.items():
            _atomic_save_array(files[split], array)
        atomic_write_bytes(meta_file, json.dumps(meta, indent=1).encode())
        meta["cache"] = f"written ({meta_file.name})"
    return arrays, meta


def _build_finite(source, *, seq_len, batch_size, seed, tokenizer, vocab_size, cache_dir, rank, world_size,
                  max_valid_tokens) -> DataBundle:
    tok, tok_description = get_tokenizer(
        tokenizer, vocab_size, cache_dir, lambda: source.iter_docs("train"), source.name, source.estimated_chars()
    )
    arrays, meta = _tokenize_finite(source, tok, cache_dir)
    train = TrainLoader(
        arrays["train"], seq_len=seq_len, batch_size=batch_size, seed=seed, rank=rank, world_size=world_size,
        name=f"--data {source.name}: the training split",
    )
    valid, selection = valid_tensor(arrays["valid"], seq_len, max_valid_tokens, f"--data {source.name}", spread=True)
    description = {"source": source.name, "kind": source.kind, "split_rule": source.split_rule, **source.describe()}
    description.update(meta)
    description.update(tok_description)
    description.update(
        vocab_size=len(tok),
        seq_len=seq_len,
        train_chunks=train.num_chunks,
        batches_per_epoch=train.batches_per_epoch,
        tokens_per_epoch_per_rank=train.tokens_per_epoch,
        valid_chunks=len(valid),
        valid_selection=selection,
    )
    return DataBundle(tokenizer=tok, train=train, valid=valid, description=description)


def _load_hub_dataset(data: str):
    """``owner/name[:config]`` as a streamed ``IterableDatasetDict``; one-line errors."""
    import datasets

    if hub_offline():
        raise UsageError(
            f"--data {data} is a Hugging Face hub dataset but the hub is offline "
            "(HF_HUB_OFFLINE/HF_DATASETS_OFFLINE); "
            f"go online, or pass a local {SUFFIX_LIST} file or folder, or --data builtin"
        )
    name, _, config = data.partition(":")
    try:
        return datasets.load_dataset(name, config or None, streaming=True)
    except Exception as error:
        raise UsageError(
            f"--data {data}: cannot stream it from the Hugging Face hub ({first_line(error)}); "
            "check the id (owner/name[:config]) and network, or pass a local file or folder"
        ) from None


def _build_stream(dataset, name, *, seq_len, batch_size, seed, tokenizer, vocab_size, cache_dir, rank, world_size,
                  max_valid_tokens, text_field, shuffle_buffer, cache_key) -> DataBundle:
    import datasets

    if isinstance(dataset, (datasets.IterableDatasetDict, dict)):
        if "train" not in dataset:
            raise UsageError(
                f"--data {name} has no 'train' split (splits: {sorted(dataset)}); use a dataset with one"
            )
        train_ds = dataset["train"]
        valid_ds = next((dataset[s] for s in ("validation", "valid") if s in dataset), None)
    else:
        train_ds, valid_ds = dataset, None
    if valid_ds is None:
        split_rule = f"document text: sha1(text) % {VALID_MODULUS} == 0 -> valid (filtered out of the train stream)"

        def is_valid(row):
            value = row.get(text_field)
            return isinstance(value, str) and is_valid_document(value)

        valid_ds = train_ds.filter(is_valid)
        train_ds = train_ds.filter(lambda row: not is_valid(row))
        if max_valid_tokens is None:
            max_valid_tokens = _DEFAULT_HUB_VALID_TOKENS
    else:
        split_rule = "the dataset's validation split"

    def texts(ds) -> Iterator[str]:
        for row in ds:
            text = stream_row_text(row, f"--data {name}", text_field)
            if text is not None:
                yield text

    tok, tok_description = get_tokenizer(tokenizer, vocab_size, cache_dir, lambda: texts(train_ds), name, None)
    dtype = token_dtype(len(tok))
    valid_file = None
    if cache_dir is not None and cache_key is not None:
        key = json.dumps([FORMAT_VERSION, cache_key, text_field, max_valid_tokens, tokenizer_fingerprint(tok)])
        valid_file = cache_dir / "data" / f"{hashlib.sha1(key.encode()).hexdigest()[:16]}-valid.npy"
    meta: dict = {"train_documents": None, "train_tokens": None}
    if valid_file is not None and valid_file.is_file():
        valid_flat = np.load(valid_file)
        meta["cache"] = f"hit ({valid_file.name})"
    else:
        parts, documents, tokens = [], 0, 0
        for batch in _batched(texts(valid_ds), 64):
            parts.append(encode_documents(tok, batch, dtype))
            documents += len(batch)
            tokens += len(parts[-1])
            if max_valid_tokens is not None and tokens >= max_valid_tokens:
                break
        valid_flat = np.concatenate(parts) if parts else np.empty(0, dtype)
        meta["valid_documents"] = documents
        if valid_file is not None:
            _atomic_save_array(valid_file, valid_flat)
    meta["valid_tokens"] = int(len(valid_flat))
    valid, selection = valid_tensor(valid_flat, seq_len, max_valid_tokens, f"--data {name}", spread=False)
    train = StreamingTrainLoader(
        train_ds, tok, seq_len=seq_len, batch_size=batch_size, text_field=text_field, seed=seed, rank=rank,
        world_size=world_size, shuffle_buffer=shuffle_buffer, name=f"--data {name}",
    )
    description = {"source": name, "kind": "stream", "split_rule": split_rule, **meta, **tok_description}
    description.update(vocab_size=len(tok), seq_len=seq_len, valid_chunks=len(valid), valid_selection=selection,
                       shuffle_buffer=shuffle_buffer)
    return DataBundle(tokenizer=tok, train=train, valid=valid, description=description)


def build_data(
    data,
    *,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    tokenizer: str | None = None,
    vocab_size: int = 32000,
    cache_dir: str | os.PathLike | None = None,
    rank: int = 0,
    world_size: int = 1,
    max_valid_tokens: int | None = 1_000_000,
    text_field: str = "text",
    shuffle_buffer: int = 0,
) -> DataBundle:
    """Tokenizer, training loader and validation chunks for ``data`` (see the :mod:`lowrank.data` docstring).

    ``data``: ``"builtin"``, a local file or folder, a hub id ``owner/name[:config]``, or (from
    Python) a ``datasets.IterableDataset`` / ``IterableDatasetDict``, which is streamed like a hub
    dataset. ``shuffle_buffer`` (streams only): example-level shuffle buffer; 0 keeps the stream's
    order (hub pretraining corpora come shuffled; ``datasets`` reorders shards per epoch) and makes
    resuming exact. All user-fixable problems raise :class:`~lowrank.errors.UsageError`.
    """
    _check_arguments(seq_len, batch_size, seed, vocab_size, rank, world_size, max_valid_tokens)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else None
    common = dict(
        seq_len=seq_len, batch_size=batch_size, seed=seed, tokenizer=tokenizer, vocab_size=vocab_size,
        cache_dir=cache, rank=rank, world_size=world_size, max_valid_tokens=max_valid_tokens,
    )
    with _rank_zero_first(rank, world_size, enabled=cache is not None):
        if not isinstance(data, (str, os.PathLike)):
            stream = dict(text_field=text_field, shuffle_buffer=shuffle_buffer, cache_key=None)
            return _build_stream(data, type(data).__name__, **common, **stream)
        data = os.fspath(data)
        source = resolve_source(data, text_field, cache)
        if isinstance(source, str):
            dataset = _load_hub_dataset(source)
            stream = dict(text_field=text_field, shuffle_buffer=shuffle_buffer, cache_key=source)
            return _build_stream(dataset, source, **common, **stream)
        return _build_finite(source, **common)
