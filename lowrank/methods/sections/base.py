"""What every section shares: value checks (each returns the normalised value or raises a one-line
:class:`~lowrank.errors.UsageError` naming the key), the "did you mean" for unknown keys, and
:class:`SectionView`, a frozen dataclass that parses itself and reads as a mapping."""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping
from dataclasses import fields
from typing import Any, Callable

import torch

from ...dtypes import dtype_name
from ...errors import UsageError


class _Check:
    """Validators: each returns the (normalised) value or raises ``UsageError('<where>: <key> ...')``."""

    @staticmethod
    def fail(where: str, key: str, expected: str, value: Any) -> UsageError:
        return UsageError(f"{where}: {key} must be {expected}, got {value!r}")

    @classmethod
    def integer(cls, minimum: int = 0, maximum: int | None = None) -> Callable:
        expected = f"an integer >= {minimum}" + (f" and < {maximum}" if maximum is not None else "")

        def check(value, where, key):
            if isinstance(value, float) and value.is_integer():
                value = int(value)  # 200.0 from a --set or a JSON round trip
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (maximum is not None and value >= maximum):
                raise cls.fail(where, key, expected, value)
            return value

        return check

    @classmethod
    def number(cls, low: float = 0.0, high: float = math.inf, *, low_open: bool = False, high_open: bool = True) -> Callable:
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        expected = f"a finite number in {left}{low:g}, {high:g}{right}"

        def check(value, where, key):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if ok:
                ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
            if not ok:
                raise cls.fail(where, key, expected, value)
            return float(value)

        return check

    @classmethod
    def flag(cls) -> Callable:
        def check(value, where, key):
            if not isinstance(value, bool):
                raise cls.fail(where, key, "true or false", value)
            return value

        return check

    @classmethod
    def choice(cls, options) -> Callable:
        def check(value, where, key):
            if value not in options:
                raise cls.fail(where, key, "one of " + ", ".join(map(str, options)), value)
            return value

        return check

    @classmethod
    def patterns(cls) -> Callable:
        """PEFT's target forms: a name/regex string or a list of names."""

        def check(value, where, key):
            if isinstance(value, str) and value:
                return value
            if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) and v for v in value):
                return list(value)
            raise cls.fail(where, key, "a module name pattern (a string) or a list of module names", value)

        return check

    @classmethod
    def pair(cls) -> Callable:
        def check(value, where, key):
            ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v < 1.0 for v in value)
            if not ok:
                raise cls.fail(where, key, "two numbers in [0, 1), e.g. [0.9, 0.999]", value)
            return tuple(float(v) for v in value)

        return check

    @staticmethod
    def optional(check: Callable) -> Callable:
        def wrapped(value, where, key):
            return None if value is None else check(value, where, key)

        return wrapped


def _unknown(key: str, known, where: str) -> UsageError:
    close = difflib.get_close_matches(key, sorted(known), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(sorted(known))}"
    return UsageError(f"{where}: unknown key {key!r}{hint}")


class SectionView(Mapping):
    """A frozen dataclass section, also readable as a mapping of its fields."""

    CHECKS: dict[str, Callable] = {}
    NAME = ""

    def __getitem__(self, key: str) -> Any:
        if key not in self._names():
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self):
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    @classmethod
    def _names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def parse(cls, data: Any, where: str):
        """Build the section from a mapping, checking every key and value."""
        if not isinstance(data, Mapping):
            raise UsageError(f"{where}: section {cls.NAME!r} must be a mapping of keys, got {data!r}")
        known = set(cls._names())
        values = {}
        for key, value in data.items():
            if key not in known:
                raise _unknown(str(key), known, f"{where}: {cls.NAME}")
            check = cls.CHECKS.get(key)
            values[key] = check(value, where, f"{cls.NAME}.{key}") if check else value
        required = [f.name for f in fields(cls) if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [key for key in required if key not in values]
        if missing:
            raise UsageError(f"{where}: section {cls.NAME!r} needs {', '.join(missing)}")
        try:
            section = cls(**values)
        except ValueError as error:
            raise UsageError(f"{where}: {cls.NAME}: {error}") from None
        section.check(where)
        return section

    def check(self, where: str) -> None:
        """Checks across keys of the section (none by default)."""

    def to_dict(self) -> dict[str, Any]:
        return {name: _plain(getattr(self, name)) for name in self._names()}


def _plain(value: Any) -> Any:
    """JSON/YAML-ready: tuples become lists, dtypes their names, mappings plain dicts."""
    if isinstance(value, torch.dtype):
        return dtype_name(value)
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
