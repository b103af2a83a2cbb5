"""The builtin corpus: docstrings of the installed Python standard library.

An offline corpus present on every machine, harvested deterministically from the stdlib's ``.py``
files (parsed with :mod:`ast`, nothing imported, nothing shipped, no network; tests, IDLE, demos
and third-party code left out). One document per module: the module docstring followed by the
docstring of each class and function, each under a header with its qualified name and signature.
With a ``cache_dir`` the harvest is cached in ``cache_dir/data/builtin-<fingerprint>.json``, keyed
by the files' names, sizes and modification times and the Python version.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import json
import os
import sys
import sysconfig
import tokenize
from pathlib import Path

from ..files import atomic_write_bytes

_HARVEST_VERSION = 1  # bump when the builtin corpus recipe changes

_BUILTIN_SKIP_DIRS = frozenset(
    {"test", "tests", "idle_test", "idlelib", "turtledemo", "site-packages", "dist-packages", "__pycache__"}
)


def stdlib_root() -> Path:
    """The folder of the installed standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def builtin_files(root: Path) -> list[str]:
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


def builtin_fingerprint(root: Path, files: list[str]) -> str:
    """Cache key of the harvest: the files' names, sizes and modification times and the Python version."""
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
    root = stdlib_root()
    files = builtin_files(root)
    cache_file = None
    if cache_dir is not None:
        cache_file = Path(cache_dir) / "data" / f"builtin-{builtin_fingerprint(root, files)}.json"
        if cache_file.is_file():
            with contextlib.suppress(ValueError, OSError):
                return [tuple(pair) for pair in json.loads(cache_file.read_text(encoding="utf-8"))]
    documents = _harvest(root, files)
    if cache_file is not None:
        atomic_write_bytes(cache_file, json.dumps(documents, ensure_ascii=False).encode("utf-8"))
    return documents
