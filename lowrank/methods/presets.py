"""The bundled presets (``configs/methods/*.yaml``) and preset files: find, read, parse once."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

import yaml

from ..errors import UsageError
from ..models import config_dir
from .sections import Method, set_dotted

__all__ = ["available_methods", "preset_path", "load_method", "method_overrides", "read_yaml"]


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's float rule: PyYAML follows YAML 1.1, which wants a dot
    in the mantissa and a sign in the exponent, so it reads ``5e-3`` or ``1e6`` — how everyone
    writes a learning rate — as the string ``'5e-3'``."""


_Loader.yaml_implicit_resolvers = {key: list(value) for key, value in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def read_yaml(text: str) -> Any:
    """``text`` parsed as YAML, ``5e-3`` read as the number it is (:class:`_Loader`)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def available_methods() -> list[str]:
    return sorted(path.stem for path in config_dir("methods").glob("*.yaml"))


def preset_path(name_or_path: str | Path) -> Path:
    """The YAML file of a bundled preset name, or the given path; a one-line error otherwise."""
    if not isinstance(name_or_path, (str, Path)) or not str(name_or_path):
        raise UsageError(f"a method is a preset name ({', '.join(available_methods())}) or a YAML path, got {name_or_path!r}")
    bundled = config_dir("methods") / f"{name_or_path}.yaml"
    if bundled.is_file():
        return bundled
    path = Path(name_or_path)
    if path.is_file():
        return path
    close = difflib.get_close_matches(str(name_or_path), available_methods(), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise UsageError(f"unknown method {str(name_or_path)!r}.{hint} Choose one of {', '.join(available_methods())} or a YAML path")


def load_method(name_or_path: str | Path, overrides: dict[str, Any] | None = None) -> Method:
    """Read a bundled preset (``"galore"``) or a YAML file, apply dotted-key ``overrides``
    (``{"optimizer.lr": 3e-3, "lowrank.rank": 64}``) and validate every key and value: one read,
    one parse. For the command-line shortcuts use :meth:`Method.with_overrides` on the result.

    Raises:
        UsageError: unknown method, unreadable or non-YAML file, a key that does not exist (the
            message suggests the closest valid one), or a value of the wrong type or range.
    """
    path = preset_path(name_or_path)
    try:
        data = read_yaml(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UsageError(f"method file {path}: not a YAML text file ({reason})") from None
    if not isinstance(data, dict):
        raise UsageError(f"method file {path}: expected a mapping of sections (description, lowrank, optimizer, restarts, "
                         "schedule, training)")
    for dotted, value in (overrides or {}).items():
        set_dotted(data, dotted, value)
    return Method.from_dict(path.stem, data, str(path))


def method_overrides(
    name_or_path: str | Path, *, rank: int | None = None, lr: float | None = None, cycle_length: int | None = None
) -> dict[str, Any]:
    """The command-line shortcuts of a preset as dotted keys (:meth:`Method.shortcut_overrides`).

    Kept for callers of earlier versions; new code calls ``load_method(name).with_overrides(rank=...)``.
    """
    return load_method(name_or_path).shortcut_overrides(rank=rank, lr=lr, cycle_length=cycle_length)
