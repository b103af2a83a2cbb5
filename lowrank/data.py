"""Pretraining data: corpora, tokenizer, packed sequences, a resumable and DDP-sharded loader.

:func:`build_data` is the one entry point. ``data`` is one of

* ``"builtin"``: an offline corpus present on every machine, harvested deterministically from the
  docstrings of the installed Python standard library (parsed with :mod:`ast`, nothing imported,
  nothing shipped, no network). One document per module: the module docstring followed by the
  docstring of each class and function, each under a header with its qualified name and signature.
* a local ``.txt`` / ``.txt.gz`` / ``.jsonl`` / ``.jsonl.gz`` / ``.parquet`` file or a folder of them
  (searched recursively, sorted). Text files split into documents at blank lines; JSON lines and
  Parquet rows are documents, read from the ``text_field`` column.
* a Hugging Face hub dataset ``owner/name`` or ``owner/name:config``, streamed with
  ``datasets.load_dataset(..., streaming=True)`` and split across DDP ranks with
  ``datasets.distributed.split_dataset_by_node`` (or, from Python, a ``datasets.IterableDataset`` or
  ``IterableDatasetDict`` object).

Validation split (fixed: the same on every rank and every run with the same inputs):

* builtin: the modules with ``sha1(relative path) % 20 == 0``;
* a folder whose files (or top-level subfolders) are named ``train*`` and ``valid*`` /
  ``validation*`` / ``val*`` / ``dev*`` (or, failing those, ``test*``): those files, other files
  are ignored;
* any other file or folder: the documents with ``sha1(text) % 20 == 0`` (duplicates land together);
* hub: the dataset's ``validation`` (or ``valid``) split if it has one, else the documents of the
  train stream with ``sha1(text) % 20 == 0``, which the train stream then filters out. (A held-out
  *prefix* does not compose with ``split_dataset_by_node``: ``datasets`` divides a ``skip(n)``
  among the shards, so each rank would skip the wrong documents.)

Packing: each document's tokens, then the EOS id, concatenated into one stream and cut into
``seq_len`` chunks (the final partial chunk is dropped): no padding. Validation of a finite corpus
is ``max_valid_tokens // seq_len`` chunks spread evenly over the whole packed validation split
(:func:`spread_chunk_indices`: one chunk drawn from each of that many equal strata, from a fixed
seed, so every run and every method is evaluated on the same tokens, and a split whose first file
is one long page is not measured on that page alone). A stream's validation is its first
``max_valid_tokens`` tokens (a hub validation split comes shuffled). ``description["valid_selection"]``
says which tokens were used.

Tokenizer: ``tokenizer`` names a local folder / ``tokenizer.json`` or a hub model. Without one, a
byte-level BPE (``tokenizers``) is trained on the training split (all of it, or a deterministic
sample of about :data:`BPE_SAMPLE_CHARS` characters) and saved with ``save_pretrained`` into
``cache_dir/tokenizer``; a later run with the same ``cache_dir`` reloads it instead of retraining.

Caches under ``cache_dir/data``: the harvested builtin corpus and, for finite corpora, the packed
token arrays (``<fingerprint>-train.npy``, ``-valid.npy``, ``.json``) keyed by the corpus files'
names, sizes and modification times plus the tokenizer, so a resumed or second run does not
re-tokenize. Under ``torch.distributed`` with a ``cache_dir``, rank 0 builds the caches first and
the other ranks then read them.
"""

from __future__ import annotations

import ast
import contextlib
import gzip
import hashlib
import io
import itertools
import json
import os
import re
import shutil
import sys
import sysconfig
import time
import tokenize
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import atomic_write_bytes
from .errors import UsageError, first_line

__all__ = [
    "BPE_SAMPLE_CHARS",
    "EOT",
    "DataBundle",
    "Packer",
    "StreamingTrainLoader",
    "TrainLoader",
    "build_data",
    "builtin_documents",
    "encode_documents",
    "load_tokenizer",
    "pack",
    "read_documents",
    "spread_chunk_indices",
    "train_bpe_tokenizer",
]

EOT = "<|endoftext|>"
"""The special token of a trained tokenizer: end of document, and also bos, pad and unk."""

BPE_SAMPLE_CHARS = 100_000_000
"""A trained BPE sees about this many characters of the training split at most."""

VALID_MODULUS = 20
"""1 in this many documents (or builtin modules) goes to validation."""

VALID_SELECTION_SEED = 0
"""Seed of the validation chunk draw: fixed, not the run's seed, so runs with different seeds are
evaluated on the same tokens."""

TEXT_SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz", ".parquet")
_SUFFIX_LIST = ".txt, .txt.gz, .jsonl, .jsonl.gz or .parquet"
_FORMAT_VERSION = 1  # bump when the packed-array layout or the document rules change
_HARVEST_VERSION = 1  # bump when the builtin corpus recipe changes
_ENCODE_BATCH = 1024  # documents per batch-encode call
_DEFAULT_HUB_VALID_TOKENS = 1_000_000

_TRAIN_NAME = re.compile(r"^(train|training)(?![a-z])")
_VALID_NAME = re.compile(r"^(valid|validation|val|dev)(?![a-z])")
_TEST_NAME = re.compile(r"^test(?![a-z])")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w.-]+)?$")


# --------------------------------------------------------------------------------------------
# Result
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _sha1_int(text: str) -> int:
    return int.from_bytes(hashlib.sha1(text.encode("utf-8", "surrogatepass")).digest()[:8], "big")


def _is_valid_document(text: str) -> bool:
    """The hash rule for corpora without named splits: 1 document in 20 goes to validation."""
    return _sha1_int(text) % VALID_MODULUS == 0


def _batched(items: Iterable, n: int) -> Iterator[list]:
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, n)):
        yield batch


def _token_dtype(vocab: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab <= 1 << 16 else np.dtype(np.int32)


def _atomic_save_array(path: Path, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array)
    atomic_write_bytes(path, buffer.getvalue())


def _hub_offline() -> bool:
    truthy = {"1", "ON", "YES", "TRUE"}
    if any(os.environ.get(v, "").upper() in truthy for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover - very old huggingface_hub
        return False


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


# --------------------------------------------------------------------------------------------
# Builtin corpus: docstrings of the installed standard library
# --------------------------------------------------------------------------------------------

_BUILTIN_SKIP_DIRS = frozenset(
    {"test", "tests", "idle_test", "idlelib", "turtledemo", "site-packages", "dist-packages", "__pycache__"}
)


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _builtin_files(root: Path) -> list[str]:
    """Relative POSIX paths of the stdlib's ``.py`` files, sorted, tests and third-party code left out."""
    found = []
    for directory, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d
            for d in dirnames
            if d not in _BUILTIN_SKIP_DIRS and not d.startswith((".", "config-"))
        )
        for name in filenames:
            if name.endswith(".py") and not name.startswith("test_"):
                found.append(Path(directory, name).relative_to(root).as_posix())
    return sorted(found)


def _module_name(relpath: str) -> str:
    name = relpath[: -len(".py")].replace("/", ".")
    return name[: -len(".__init__")] if name.endswith(".__init__") else name


def _module_document(relpath: str, source: str) -> str | None:
    """Module docstring, then each class / function docstring under a ``class q(bases)`` /
    ``def q(args) -> ret`` header (q = qualified name); ``None`` when the module has no docstrings."""
    tree = ast.parse(source, filename=relpath)
    module = _module_name(relpath)
    parts = []
    doc = ast.get_docstring(tree, clean=True)
    if doc:
        parts.append(f"Module {module}\n\n{doc}")

    def visit(node: ast.AST, prefix: str) -> None:
        for child in getattr(node, "body", []):
            if not isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            qualified = f"{prefix}.{child.name}"
            doc = ast.get_docstring(child, clean=True)
            if doc:
                if isinstance(child, ast.ClassDef):
                    bases = ", ".join(ast.unparse(b) for b in [*child.bases, *child.keywords])
                    header = f"class {qualified}({bases})" if bases else f"class {qualified}"
                else:
                    keyword = "async def" if isinstance(child, ast.AsyncFunctionDef) else "def"
                    header = f"{keyword} {qualified}({ast.unparse(child.args)})"
                    if child.returns is not None:
                        header += f" -> {ast.unparse(child.returns)}"
                parts.append(f"{header}\n\n{doc}")
            visit(child, qualified)

    visit(tree, module)
    return "\n\n".join(parts) if parts else None


def _builtin_fingerprint(root: Path, files: list[str]) -> str:
    stats = []
    for rel in files:
        st = (root / rel).stat()
        stats.append((rel, st.st_size, st.st_mtime_ns))
    key = json.dumps([_HARVEST_VERSION, sys.version, stats])
    return hashlib.sha1(key.encode()).hexdigest()[:16]


def _harvest(root: Path, files: list[str]) -> list[tuple[str, str]]:
    documents = []
    for rel in files:
        try:
            with tokenize.open(root / rel) as f:  # honours PEP 263 coding cookies
                source = f.read()
            doc = _module_document(rel, source)
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError, RecursionError):
            continue
        if doc:
            documents.append((rel, doc))
    return documents


def builtin_documents(cache_dir: str | os.PathLike | None = None) -> list[tuple[str, str]]:
    """The builtin corpus: ``(relative module path, document)`` pairs, sorted by path.

    Deterministic for a given Python installation. Modules are parsed with :mod:`ast`, never
    imported. With ``cache_dir`` the harvest is cached in ``cache_dir/data/builtin-<fp>.json``.
    """
    root = _stdlib_root()
    files = _builtin_files(root)
    cache_file = None
    if cache_dir is not None:
        cache_file = Path(cache_dir) / "data" / f"builtin-{_builtin_fingerprint(root, files)}.json"
        if cache_file.is_file():
            with contextlib.suppress(ValueError, OSError):
                return [tuple(pair) for pair in json.loads(cache_file.read_text(encoding="utf-8"))]
    documents = _harvest(root, files)
    if cache_file is not None:
        atomic_write_bytes(cache_file, json.dumps(documents, ensure_ascii=False).encode("utf-8"))
    return documents


# --------------------------------------------------------------------------------------------
# Local files
# --------------------------------------------------------------------------------------------


def _suffix(path: Path) -> str | None:
    name = path.name.lower()
    return next((s for s in sorted(TEXT_SUFFIXES, key=len, reverse=True) if name.endswith(s)), None)


def _open_text(path: Path):
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    # Undecodable bytes become U+FFFD rather than stopping a long run on one bad byte.
    return opener(path, "rt", encoding="utf-8", errors="replace")


def _paragraphs(lines: Iterable[str]) -> Iterator[str]:
    """Documents of a text file: runs of lines separated by blank (or whitespace-only) lines."""
    block: list[str] = []
    for line in lines:
        if line.strip():
            block.append(line)
        elif block:
            yield "".join(block).rstrip("\n")
            block = []
    if block:
        yield "".join(block).rstrip("\n")


def _row_text(value: Any, path: Path, where: str, text_field: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise UsageError(
            f"{path} {where}: field {text_field!r} holds {type(value).__name__}, not text; "
            "pass --text-field naming a string column"
        )
    return value if value.strip() else None


def _stream_row_text(row: dict, label: str, text_field: str) -> str | None:
    """The text of one streamed row (``None`` for an empty one); ``label`` names the source in errors."""
    if text_field not in row:
        raise UsageError(f"{label}: no {text_field!r} column (found {sorted(row)}); pass --text-field naming the text column")
    return _row_text(row[text_field], Path(label), "row", text_field)


def read_documents(path: str | os.PathLike, text_field: str = "text") -> Iterator[str]:
    """The documents of one local file, in order (empty documents are skipped)."""
    path = Path(path)
    suffix = _suffix(path)
    if suffix in (".txt", ".txt.gz"):
        try:
            with _open_text(path) as f:
                yield from _paragraphs(f)
        except (OSError, EOFError) as error:
            raise UsageError(f"{path}: cannot read it ({first_line(error)}); check the file") from None
    elif suffix in (".jsonl", ".jsonl.gz"):
        with _open_text(path) as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    raise UsageError(
                        f"{path} line {number}: not valid JSON; write one JSON object per line"
                    ) from None
                if not isinstance(row, dict) or text_field not in row:
                    keys = sorted(row) if isinstance(row, dict) else type(row).__name__
                    raise UsageError(
                        f"{path} line {number}: no {text_field!r} field (found {keys}); "
                        "pass --text-field naming the text column"
                    )
                text = _row_text(row[text_field], path, f"line {number}", text_field)
                if text is not None:
                    yield text
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(path)
        except Exception as error:
            raise UsageError(f"{path}: not a readable Parquet file ({first_line(error)}); check the file") from None
        columns = parquet.schema_arrow.names
        if text_field not in columns:
            raise UsageError(
                f"{path}: no {text_field!r} column (found {columns}); pass --text-field naming the text column"
            )
        for batch in parquet.iter_batches(batch_size=1024, columns=[text_field]):
            for value in batch.column(0).to_pylist():
                text = _row_text(value, path, "row", text_field)
                if text is not None:
                    yield text
    else:
        raise UsageError(f"{path}: unsupported file type; use {_SUFFIX_LIST} files")


# --------------------------------------------------------------------------------------------
# Sources: where documents come from and how they split
# --------------------------------------------------------------------------------------------


class _FiniteSource:
    """A corpus read in full: ``iter_docs(split)`` for split in ("train", "valid")."""

    kind: str
    name: str
    split_rule: str

    def fingerprint(self) -> str:  # cheap: no reading of the text
        raise NotImplementedError

    def iter_docs(self, split: str) -> Iterator[str]:
        raise NotImplementedError

    def estimated_chars(self) -> int | None:
        return None

    def describe(self) -> dict:
        return {}


class _BuiltinSource(_FiniteSource):
    kind = "builtin"
    name = "builtin"
    split_rule = f"module path: sha1(path) % {VALID_MODULUS} == 0 -> valid"

    def __init__(self, cache_dir: Path | None):
        self.cache_dir = cache_dir
        self.root = _stdlib_root()
        self._documents: list[tuple[str, str]] | None = None

    def fingerprint(self) -> str:
        return "builtin-" + _builtin_fingerprint(self.root, _builtin_files(self.root))

    def documents(self) -> list[tuple[str, str]]:
        if self._documents is None:
            self._documents = builtin_documents(self.cache_dir)
        return self._documents

    def iter_docs(self, split: str) -> Iterator[str]:
        want_valid = split == "valid"
        for rel, doc in self.documents():
            if (_sha1_int(rel) % VALID_MODULUS == 0) == want_valid:
                yield doc

    def describe(self) -> dict:
        return {"python": sys.version.split()[0], "stdlib": str(self.root)}


class _LocalSource(_FiniteSource):
    kind = "local"

    def __init__(self, path: Path, text_field: str):
        self.path = path
        self.name = str(path)
        self.text_field = text_field
        if path.is_file():
            if _suffix(path) is None:
                raise UsageError(
                    f"--data {path}: unsupported file type; use {_SUFFIX_LIST} files or a folder of them"
                )
            files = [path]
            relative = [path.name]
        else:
            files, relative = [], []
            for file in sorted(path.rglob("*")):
                rel = file.relative_to(path)
                if any(part.startswith(".") for part in rel.parts) or not file.is_file():
                    continue
                if _suffix(file) is not None:
                    files.append(file)
                    relative.append(rel.as_posix())
            if not files:
                raise UsageError(
                    f"--data {path}: the folder holds no {_SUFFIX_LIST} files; point --data at text data"
                )
        self.files = files
        self.relative = relative
        # Named splits: classify by the first component of the relative path (file or subfolder).
        first = [r.split("/")[0].lower() for r in relative]
        train = [f for f, n in zip(files, first) if _TRAIN_NAME.match(n)]
        valid = [f for f, n in zip(files, first) if _VALID_NAME.match(n)]
        test = [f for f, n in zip(files, first) if _TEST_NAME.match(n)]
        if path.is_dir() and train and (valid or test):
            self.splits: dict[str, list[Path]] | None = {"train": train, "valid": valid or test}
            self.ignored = len(files) - len(train) - len(valid or test)
            used = "valid" if valid else "test"
            self.split_rule = f"named files: train* -> train, {used}* -> valid"
        else:
            self.splits = None
            self.ignored = 0
            self.split_rule = f"document text: sha1(text) % {VALID_MODULUS} == 0 -> valid"

    def fingerprint(self) -> str:
        stats = []
        for file, rel in zip(self.files, self.relative):
            st = file.stat()
            stats.append((rel, st.st_size, st.st_mtime_ns))
        key = json.dumps([_FORMAT_VERSION, self.text_field, self.split_rule, stats])
        return "local-" + hashlib.sha1(key.encode()).hexdigest()[:16]

    def iter_docs(self, split: str) -> Iterator[str]:
        if self.splits is not None:
            for file in self.splits[split]:
                yield from read_documents(file, self.text_field)
            return
        want_valid = split == "valid"
        for file in self.files:
            for doc in read_documents(file, self.text_field):
                if _is_valid_document(doc) == want_valid:
                    yield doc

    def estimated_chars(self) -> int:
        total = 0
        for file in self.files:
            size = file.stat().st_size
            total += size * 4 if file.name.lower().endswith(".gz") else size
        return total

    def describe(self) -> dict:
        out = {"files": len(self.files)}
        if self.splits is not None:
            out.update(train_files=len(self.splits["train"]), valid_files=len(self.splits["valid"]))
            if self.ignored:
                out["ignored_files"] = self.ignored
        return out


def _looks_like_hub_id(data: str) -> bool:
    return bool(_HUB_ID.match(data)) and _suffix(Path(data)) is None and not data.startswith(".")


def _resolve_source(data: str, text_field: str, cache_dir: Path | None) -> _FiniteSource | str:
    """A finite source, or the hub id string (checked) for a streamed hub dataset."""
    if data == "builtin":
        return _BuiltinSource(cache_dir)
    path = Path(data).expanduser()
    if path.exists():
        return _LocalSource(path, text_field)
    if _looks_like_hub_id(data):
        return data
    raise UsageError(
        f"--data {data}: no such file or folder; pass an existing {_SUFFIX_LIST} file or folder, "
        "'builtin', or a hub dataset as owner/name[:config]"
    )


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


def _wrap_tokenizer(backend) -> Any:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=EOT,
        eos_token=EOT,
        unk_token=EOT,
        pad_token=EOT,
        clean_up_tokenization_spaces=False,
    )


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> Any:
    """Train a byte-level BPE (``tokenizers``) on ``texts``; ``<|endoftext|>`` is the only special
    token (eos, bos, pad and unk). Returns a ``PreTrainedTokenizerFast``. The vocabulary may come out
    smaller than ``vocab_size`` on a small corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return _wrap_tokenizer(backend)


def _ensure_special_tokens(tok) -> Any:
    """A tokenizer without an eos token gets one: an existing ``<|endoftext|>``, ``</s>``, ``<eos>``
    or ``[SEP]`` from its vocabulary, else a new ``<|endoftext|>`` special token (one more id).
    A missing pad token becomes the eos token."""
    if tok.eos_token is None:
        vocab = tok.get_vocab()
        existing = next((t for t in (EOT, "</s>", "<eos>", "[SEP]") if t in vocab), None)
        if existing is not None:
            tok.eos_token = existing
        else:
            tok.add_special_tokens({"eos_token": EOT})
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_tokenizer(name_or_path: str) -> Any:
    """Load ``--tokenizer``: a local folder (``save_pretrained`` / ``tokenizer.json`` inside), a
    ``tokenizer.json`` file, or a hub model name. Raises :class:`UsageError` on failure."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(name_or_path).expanduser()
    option = f"--tokenizer {name_or_path}"
    hint = "pass a folder saved with save_pretrained or a tokenizer.json file, or omit --tokenizer to train a BPE"
    if path.exists():
        try:
            if path.is_file():
                if path.suffix != ".json":
                    raise UsageError(f"{option}: a tokenizer file must be a tokenizer.json; {hint}")
                tok = PreTrainedTokenizerFast(tokenizer_file=str(path), clean_up_tokenization_spaces=False)
            else:
                tok = AutoTokenizer.from_pretrained(str(path))
        except UsageError:
            raise
        except Exception as error:
            raise UsageError(f"{option}: cannot load a tokenizer from it ({first_line(error)}); {hint}") from None
    elif name_or_path.startswith((".", "/", "~")) or name_or_path.endswith(".json") or name_or_path.count("/") > 1:
        raise UsageError(f"{option}: no such file or folder; {hint}")
    else:
        try:
            tok = AutoTokenizer.from_pretrained(name_or_path)
        except Exception as error:
            if _hub_offline():
                raise UsageError(
                    f"{option}: not in the local Hugging Face cache and the hub is offline (HF_HUB_OFFLINE); "
                    "pass a local tokenizer folder or tokenizer.json, or omit --tokenizer to train a BPE on the data"
                ) from None
            raise UsageError(
                f"{option}: cannot load it from the Hugging Face hub ({first_line(error)}); "
                "check the name and network, pass a local tokenizer folder, or omit --tokenizer"
            ) from None
    if getattr(tok, "backend_tokenizer", None) is None:
        raise UsageError(f"{option}: not a fast tokenizer (no tokenizer.json); {hint}")
    return _ensure_special_tokens(tok)


def _tokenizer_fingerprint(tok) -> str:
    key = tok.backend_tokenizer.to_str() + f"\neos={tok.eos_token_id}\nlen={len(tok)}"
    return hashlib.sha1(key.encode()).hexdigest()[:16]


def _sample_for_bpe(texts: Iterable[str], estimated_chars: int | None) -> Iterator[str]:
    """All texts if the corpus is small, else a deterministic hash sample of about
    :data:`BPE_SAMPLE_CHARS` characters (capped there in any case)."""
    rate = 1.0 if not estimated_chars else min(1.0, BPE_SAMPLE_CHARS / estimated_chars)
    threshold = int(rate * 2**64)
    total = 0
    for text in texts:
        if rate < 1.0 and int.from_bytes(hashlib.sha1(b"bpe" + text.encode()).digest()[:8], "big") >= threshold:
            continue
        yield text
        total += len(text)
        if total >= BPE_SAMPLE_CHARS:
            return


def _get_tokenizer(
    tokenizer: str | None,
    vocab_size: int,
    cache_dir: Path | None,
    train_texts: Callable[[], Iterable[str]],
    source_name: str,
    estimated_chars: int | None,
) -> tuple[Any, dict]:
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
        return tok, {"tokenizer": tokenizer, "tokenizer_trained": False}
    saved = cache_dir / "tokenizer" if cache_dir is not None else None
    if saved is not None and (saved / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        tok = _ensure_special_tokens(PreTrainedTokenizerFast.from_pretrained(str(saved)))
        meta_file = saved / "lowrank_data.json"
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        if meta and (meta.get("data") != source_name or meta.get("vocab_size") != vocab_size):
            warnings.warn(
                f"reusing the tokenizer cached in {saved} (trained on {meta.get('data')} with vocab_size "
                f"{meta.get('vocab_size')}); delete that folder to train a new one",
                stacklevel=3,
            )
        return tok, {"tokenizer": str(saved), "tokenizer_trained": False}
    seen = {"documents": 0, "chars": 0}

    def counted(texts: Iterable[str]) -> Iterator[str]:
        for text in texts:
            seen["documents"] += 1
            seen["chars"] += len(text)
            yield text

    start = time.perf_counter()
    tok = train_bpe_tokenizer(counted(_sample_for_bpe(train_texts(), estimated_chars)), vocab_size)
    seconds = time.perf_counter() - start
    if seen["documents"] == 0:
        raise UsageError(
            f"--data {source_name}: the training split holds no text to train a tokenizer on; "
            "point --data at text data"
        )
    if saved is not None:
        tmp = saved.with_name(f"tokenizer.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tok.save_pretrained(str(tmp))
        meta = {"data": source_name, "vocab_size": vocab_size, "trained_vocab": len(tok)}
        meta.update(seen, seconds=round(seconds, 2))
        (tmp / "lowrank_data.json").write_text(json.dumps(meta, indent=1))
        try:
            os.replace(tmp, saved)
        except OSError:  # another process saved it first: keep theirs (training is deterministic)
            shutil.rmtree(tmp, ignore_errors=True)
        from transformers import PreTrainedTokenizerFast

        # What a resumed run will load, so that both runs see the very same tokenizer object.
        tok = _ensure_special_tokens(PreTrainedTokenizerFast.from_pretrained(str(saved)))
    description = {"tokenizer": f"trained byte-level BPE ({str(saved) if saved else 'not saved'})"}
    description.update(
        tokenizer_trained=True,
        tokenizer_train_seconds=round(seconds, 2),
        tokenizer_train_documents=seen["documents"],
        tokenizer_train_chars=seen["chars"],
    )
    return tok, description


# --------------------------------------------------------------------------------------------
# Encoding and packing (shared by the finite and the streaming paths)
# --------------------------------------------------------------------------------------------


def encode_documents(tokenizer, texts: list[str], dtype: np.dtype | None = None) -> np.ndarray:
    """Batch-encode ``texts`` (no special tokens added) and return their ids as one flat array,
    each document followed by the eos id: the packing stream."""
    backend = tokenizer.backend_tokenizer
    eos = tokenizer.eos_token_id
    dtype = dtype or _token_dtype(len(tokenizer))
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


# --------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------


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
        self._dtype = _token_dtype(len(tokenizer))
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
        texts = [text for row in rows if (text := _stream_row_text(row, self.name, self.text_field)) is not None]
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


# --------------------------------------------------------------------------------------------
# build_data
# --------------------------------------------------------------------------------------------


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


def _valid_tensor(flat: np.ndarray, seq_len: int, max_valid_tokens: int | None, name: str,
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


def _tokenize_finite(source: _FiniteSource, tok, cache_dir: Path | None) -> tuple[dict, dict]:
    """Packed token streams of both splits plus their counts, from the cache when possible."""
    key = json.dumps([_FORMAT_VERSION, source.fingerprint(), _tokenizer_fingerprint(tok)])
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
    dtype = _token_dtype(len(tok))
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
    tok, tok_description = _get_tokenizer(
        tokenizer, vocab_size, cache_dir, lambda: source.iter_docs("train"), source.name, source.estimated_chars()
    )
    arrays, meta = _tokenize_finite(source, tok, cache_dir)
    train = TrainLoader(
        arrays["train"], seq_len=seq_len, batch_size=batch_size, seed=seed, rank=rank, world_size=world_size,
        name=f"--data {source.name}: the training split",
    )
    valid, selection = _valid_tensor(arrays["valid"], seq_len, max_valid_tokens, f"--data {source.name}", spread=True)
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

    if _hub_offline():
        raise UsageError(
            f"--data {data} is a Hugging Face hub dataset but the hub is offline "
            "(HF_HUB_OFFLINE/HF_DATASETS_OFFLINE); "
            f"go online, or pass a local {_SUFFIX_LIST} file or folder, or --data builtin"
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
            return isinstance(value, str) and _is_valid_document(value)

        valid_ds = train_ds.filter(is_valid)
        train_ds = train_ds.filter(lambda row: not is_valid(row))
        if max_valid_tokens is None:
            max_valid_tokens = _DEFAULT_HUB_VALID_TOKENS
    else:
        split_rule = "the dataset's validation split"

    def texts(ds) -> Iterator[str]:
        for row in ds:
            text = _stream_row_text(row, f"--data {name}", text_field)
            if text is not None:
                yield text

    tok, tok_description = _get_tokenizer(tokenizer, vocab_size, cache_dir, lambda: texts(train_ds), name, None)
    dtype = _token_dtype(len(tok))
    valid_file = None
    if cache_dir is not None and cache_key is not None:
        key = json.dumps([_FORMAT_VERSION, cache_key, text_field, max_valid_tokens, _tokenizer_fingerprint(tok)])
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
    valid, selection = _valid_tensor(valid_flat, seq_len, max_valid_tokens, f"--data {name}", spread=False)
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
    """Tokenizer, training loader and validation chunks for ``data`` (see the module docstring).

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
        source = _resolve_source(data, text_field, cache)
        if isinstance(source, str):
            dataset = _load_hub_dataset(source)
            stream = dict(text_field=text_field, shuffle_buffer=shuffle_buffer, cache_key=source)
            return _build_stream(dataset, source, **common, **stream)
        return _build_finite(source, **common)
