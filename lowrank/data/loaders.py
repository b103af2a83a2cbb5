"""The training loaders: never-ending, resumable, DDP-sharded iterators of
``(batch_size, seq_len)`` LongTensor batches.

:class:`TrainLoader` reads a packed finite corpus in a fresh permutation every epoch;
:class:`StreamingTrainLoader` packs a ``datasets.IterableDataset`` (a hub stream) on the fly.
Both resume from their :meth:`state_dict`: exactly, unless a stream has a shuffle buffer.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterator

import numpy as np
import torch

from ..errors import UsageError
from .packing import Packer, encode_documents, token_dtype
from .sources import stream_row_text


class TrainLoader:
    """Never-ending iterator of ``(batch_size, seq_len)`` LongTensor batches over a packed corpus.

    Epoch ``e`` permutes all chunks with ``numpy.random.default_rng([seed, e])``; position ``i`` of
    that order goes to rank ``i % world_size``; the tail that would not give every rank a full batch
    is dropped, so every rank takes ``batches_per_epoch`` steps. The state (epoch, step) is the same
    on every rank, so any rank's :meth:`state_dict` resumes all of them.
    """

    kind = "packed"

    def __init__(
        self,
        tokens: np.ndarray,
        *,
        seq_len: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        name: str = "the training split",
    ):
        self.tokens = tokens
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.num_chunks = len(tokens) // seq_len
        self.batches_per_epoch = self.num_chunks // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise UsageError(
                f"{name} has {len(tokens)} tokens = {self.num_chunks} chunks of --seq-len {seq_len}, fewer than "
                f"one batch per rank ({batch_size} x {world_size} ranks); use more data, a shorter --seq-len "
                "or a smaller batch"
            )
        self.tokens_per_epoch = self.batches_per_epoch * batch_size * seq_len
        self.epoch = 0
        self.step = 0
        self._order: np.ndarray | None = None
        self._order_epoch = -1

    def epoch_order(self, epoch: int) -> np.ndarray:
        """``(batches_per_epoch, batch_size)`` chunk indices this rank reads in ``epoch``."""
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_chunks)
        used = perm[: self.batches_per_epoch * self.batch_size * self.world_size]
        return used[self.rank :: self.world_size].reshape(self.batches_per_epoch, self.batch_size)

    def chunk(self, index) -> np.ndarray:
        index = np.asarray(index)
        positions = index[..., None] * self.seq_len + np.arange(self.seq_len)
        return np.asarray(self.tokens[positions], dtype=np.int64)

    def __iter__(self) -> TrainLoader:
        return self

    def __next__(self) -> torch.Tensor:
        if self._order_epoch != self.epoch:
            self._order, self._order_epoch = self.epoch_order(self.epoch), self.epoch
        batch = torch.from_numpy(self.chunk(self._order[self.step]))
        self.step += 1
        if self.step == self.batches_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        return batch

    def state_dict(self) -> dict:
        return {
            "kind": self.kind,
            "epoch": self.epoch,
            "step": self.step,
            "seed": self.seed,
            "num_chunks": self.num_chunks,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume: the next batches are exactly those an uninterrupted run would have yielded. The
        saved seed wins. With another batch size or world size, the position is carried over as the
        number of chunks the whole job consumed (rounded down to a step, with a warning)."""
        if state.get("kind") != self.kind:
            raise UsageError(
                f"the checkpoint's data state is for a {state.get('kind')} loader, not a {self.kind} one; "
                "resume with the same --data"
            )
        if state["seq_len"] != self.seq_len or state["num_chunks"] != self.num_chunks:
            raise UsageError(
                f"the checkpoint's data state is for {state['num_chunks']} chunks of --seq-len {state['seq_len']}, "
                f"this corpus has {self.num_chunks} of {self.seq_len}; "
                "resume with the same --data, --tokenizer and --seq-len"
            )
        self.seed = int(state["seed"])
        epoch, step = int(state["epoch"]), int(state["step"])
        if (state["batch_size"], state["world_size"]) != (self.batch_size, self.world_size):
            consumed = step * state["batch_size"] * state["world_size"]
            per_step = self.batch_size * self.world_size
            if consumed % per_step:
                warnings.warn(
                    f"batch size x world size changed from {state['batch_size']} x {state['world_size']} to "
                    f"{self.batch_size} x {self.world_size}: resuming at the step boundary before chunk {consumed}",
                    stacklevel=2,
                )
            step = consumed // per_step
        self.epoch, self.step = epoch + step // self.batches_per_epoch, step % self.batches_per_epoch
        self._order_epoch = -1


class StreamingTrainLoader:
    """Never-ending iterator of ``(batch_size, seq_len)`` LongTensor batches packed on the fly from a
    ``datasets.IterableDataset`` (a hub stream). This rank reads its own share
    (``split_dataset_by_node``); at the end of the stream the epoch rolls over (``set_epoch``).

    :meth:`state_dict` holds the dataset's own ``state_dict()`` plus the packer's leftover tokens,
    so a resumed run yields exactly the batches an uninterrupted one would (unless
    ``shuffle_buffer > 0``: ``datasets`` refills a shuffle buffer from scratch on resume). The state
    is per rank. ``tokens_per_epoch`` and ``batches_per_epoch`` are ``None`` (unknown for a stream).
    """

    kind = "stream"

    def __init__(
        self,
        dataset,
        tokenizer,
        *,
        seq_len: int,
        batch_size: int,
        text_field: str = "text",
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 0,
        docs_per_read: int = 64,
        name: str = "the training stream",
    ):
        from datasets.distributed import split_dataset_by_node

        if shuffle_buffer:
            dataset = dataset.shuffle(seed=seed, buffer_size=shuffle_buffer)
        if world_size > 1:
            dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
        self.dataset = dataset
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.text_field = text_field
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.docs_per_read = docs_per_read
        self.name = name
        self.tokens_per_epoch = None
        self.batches_per_epoch = None
        self.epoch = 0
        self._dtype = token_dtype(len(tokenizer))
        self._packer = Packer(seq_len)
        self._iterator: Iterator | None = None
        self._dataset_state: dict | None = None  # after the documents already in the packer
        self._docs_this_epoch = 0

    def _read(self) -> list[str]:
        if self._iterator is None:
            self.dataset.set_epoch(self.epoch)
            if self._dataset_state is not None:
                self.dataset.load_state_dict(self._dataset_state)
            self._iterator = iter(self.dataset)
        rows = list(itertools.islice(self._iterator, self.docs_per_read))
        texts = [text for row in rows if (text := stream_row_text(row, self.name, self.text_field)) is not None]
        self._docs_this_epoch += len(texts)
        if len(rows) < self.docs_per_read:  # the stream ended: next epoch
            if self._docs_this_epoch == 0:
                raise UsageError(f"{self.name} holds no text for rank {self.rank}; point --data at text data")
            self._iterator, self._dataset_state = None, None
            self.epoch += 1
            self._docs_this_epoch = 0
        else:
            self._dataset_state = self.dataset.state_dict()
        return texts

    def __iter__(self) -> StreamingTrainLoader:
        return self

    def __next__(self) -> torch.Tensor:
        while (batch := self._packer.take(self.batch_size)) is None:
            texts = self._read()
            if texts:
                self._packer.add(encode_documents(self.tokenizer, texts, self._dtype))
        return torch.from_numpy(batch)

    def state_dict(self) -> dict:
        return {
            "kind": self.kind,
            "epoch": self.epoch,
            "dataset": self._dataset_state,
            "leftover": self._packer.leftover(),
            "docs_this_epoch": self._docs_this_epoch,
            "seq_len": self.seq_len,
            "rank": self.rank,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != self.kind:
            raise UsageError(
                f"the checkpoint's data state is for a {state.get('kind')} loader, not a {self.kind} one; "
                "resume with the same --data"
            )
        if (state["seq_len"], state["rank"], state["world_size"]) != (self.seq_len, self.rank, self.world_size):
            raise UsageError(
                "the checkpoint's stream state was saved with another --seq-len, rank or world size; "
                "resume a streamed run with the same --seq-len and number of processes"
            )
        self.epoch = int(state["epoch"])
        self._dataset_state = state["dataset"]
        self._packer = Packer(self.seq_len, state["leftover"])
        self._docs_this_epoch = int(state.get("docs_this_epoch", 0))
        self._iterator = None
