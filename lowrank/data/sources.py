"""Where documents come from and how they split into training and validation.

Local files: ``.txt`` / ``.txt.gz`` split into documents at blank lines; ``.jsonl`` / ``.jsonl.gz``
lines and ``.parquet`` rows are documents, read from the ``text_field`` column
(:func:`read_documents`). A folder is searched recursively, sorted, hidden paths skipped.

A finite source reads its corpus in full, split by a fixed rule (the same on every rank and every
run with the same inputs):

* builtin (:mod:`.builtin`): the modules with ``sha1(relative path) % 20 == 0`` go to validation;
* a folder whose files (or top-level subfolders) are named ``train*`` and ``valid*`` /
  ``validation*`` / ``val*`` / ``dev*`` (or, failing those, ``test*``): those files, other files
  are ignored;
* any other file or folder: the documents with ``sha1(text) % 20 == 0`` (duplicates land together).

Anything else that looks like ``owner/name[:config]`` is a hub dataset id, which
:func:`resolve_source` hands back as a string to be streamed.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ..errors import UsageError, first_line
from .builtin import builtin_documents, builtin_files, builtin_fingerprint, stdlib_root
from .common import FORMAT_VERSION, VALID_MODULUS, is_valid_document, sha1_int

TEXT_SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz", ".parquet")
SUFFIX_LIST = ".txt, .txt.gz, .jsonl, .jsonl.gz or .parquet"

_TRAIN_NAME = re.compile(r"^(train|training)(?![a-z])")
_VALID_NAME = re.compile(r"^(valid|validation|val|dev)(?![a-z])")
_TEST_NAME = re.compile(r"^test(?![a-z])")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w.-]+)?$")


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


def stream_row_text(row: dict, label: str, text_field: str) -> str | None:
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
        raise UsageError(f"{path}: unsupported file type; use {SUFFIX_LIST} files")


# --------------------------------------------------------------------------------------------
# Sources: where documents come from and how they split
# --------------------------------------------------------------------------------------------


class FiniteSource:
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


class _BuiltinSource(FiniteSource):
    kind = "builtin"
    name = "builtin"
    split_rule = f"module path: sha1(path) % {VALID_MODULUS} == 0 -> valid"

    def __init__(self, cache_dir: Path | None):
        self.cache_dir = cache_dir
        self.root = stdlib_root()
        self._documents: list[tuple[str, str]] | None = None

    def fingerprint(self) -> str:
        return "builtin-" + builtin_fingerprint(self.root, builtin_files(self.root))

    def documents(self) -> list[tuple[str, str]]:
        if self._documents is None:
            self._documents = builtin_documents(self.cache_dir)
        return self._documents

    def iter_docs(self, split: str) -> Iterator[str]:
        want_valid = split == "valid"
        for rel, doc in self.documents():
            if (sha1_int(rel) % VALID_MODULUS == 0) == want_valid:
                yield doc

    def describe(self) -> dict:
        return {"python": sys.version.split()[0], "stdlib": str(self.root)}


class _LocalSource(FiniteSource):
    kind = "local"

    def __init__(self, path: Path, text_field: str):
        self.path = path
        self.name = str(path)
        self.text_field = text_field
        if path.is_file():
            if _suffix(path) is None:
                raise UsageError(
                    f"--data {path}: unsupported file type; use {SUFFIX_LIST} files or a folder of them"
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
                    f"--data {path}: the folder holds no {SUFFIX_LIST} files; point --data at text data"
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
        key = json.dumps([FORMAT_VERSION, self.text_field, self.split_rule, stats])
        return "local-" + hashlib.sha1(key.encode()).hexdigest()[:16]

    def iter_docs(self, split: str) -> Iterator[str]:
        if self.splits is not None:
            for file in self.splits[split]:
                yield from read_documents(file, self.text_field)
            return
        want_valid = split == "valid"
        for file in self.files:
            for doc in read_documents(file, self.text_field):
                if is_valid_document(doc) == want_valid:
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


def resolve_source(data: str, text_field: str, cache_dir: Path | None) -> FiniteSource | str:
    """A finite source, or the hub id string (checked) for a streamed hub dataset."""
    if data == "builtin":
        return _BuiltinSource(cache_dir)
    path = Path(data).expanduser()
    if path.exists():
        return _LocalSource(path, text_field)
    if _looks_like_hub_id(data):
        return data
    raise UsageError(
        f"--data {data}: no such file or folder; pass an existing {SUFFIX_LIST} file or folder, "
        "'builtin', or a hub dataset as owner/name[:config]"
    )
