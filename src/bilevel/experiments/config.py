"""Experiment configuration: TOML defaults, ``--config`` files, ``--set key=value`` overrides.

A configuration is a dict of top-level values and one level of tables (``[data]``, ``[model]``,
...) holding str / int / float / bool / list values. Keys are addressed with dots
(``data.n_train``). :func:`resolve` starts from an experiment's defaults and applies a file,
then the overrides, checking every key and type: an unknown key or a value of the wrong type
raises :class:`~bilevel.errors.ConfigError` naming the valid keys.

Reading uses :mod:`tomllib`; :func:`dumps` is the package's one TOML writer (run configs and the
benchmark configs), so the resolved ``config.toml`` of a run reads back to the same dict.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError

__all__ = ["read", "loads", "dumps", "parse_value", "flatten", "unflatten", "resolve", "parse_sets"]

Scalar = str | int | float | bool
_BARE = re.compile(r"^[A-Za-z0-9_-]+$")


# --- TOML in and out --------------------------------------------------------------------------
def loads(text: str, source: str = "<string>") -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: invalid TOML: {e}") from e


def read(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    return loads(path.read_text(encoding="utf-8"), str(path))


def _key(k: str) -> str:
    return k if _BARE.match(k) else json.dumps(k, ensure_ascii=False)


def _value(v: Any, where: str) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):  # JSON string escapes are valid TOML basic-string escapes
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(u, where) for u in v) + "]"
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{_key(str(k))} = {_value(u, f'{where}.{k}')}" for k, u in v.items()) + "}"
    raise ConfigError(f"{where}: cannot write a {type(v).__name__} to TOML")


def dumps(cfg: Mapping[str, Any], header: str = "",
          inline: Callable[[tuple[str, ...]], bool] | None = None) -> str:
    """TOML text of a nested dict (the one TOML writer of the package; reads back with :func:`loads`).

    Top-level values first, then one ``[table]`` per dict, nested dicts as ``[table.sub]`` —
    or as inline tables ``{a = 1}`` where ``inline(path)`` is true (``path``: the keys from the
    top). ``header``: comment lines at the top.
    """
    lines = [f"# {h}" if h else "#" for h in header.splitlines()] + ([""] if header else [])

    def table(d: Mapping[str, Any], path: tuple[str, ...]) -> None:
        subs = []
        for k, v in d.items():
            where = ".".join((*path, str(k)))
            if isinstance(v, Mapping) and not (inline and inline((*path, str(k)))):
                subs.append((str(k), v))
            else:
                lines.append(f"{_key(str(k))} = {_value(v, where)}")
        for k, v in subs:
            if lines and lines[-1] != "":
                lines.append("")
            lines.append("[" + ".".join(_key(p) for p in (*path, k)) + "]")
            table(v, (*path, k))

    table(cfg, ())
    return "\n".join(lines) + "\n"


# --- flat <-> nested ----------------------------------------------------------------------------
def flatten(cfg: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        if isinstance(v, Mapping):
            for kk, vv in v.items():
                out[f"{k}.{kk}"] = vv
        else:
            out[k] = v
    return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in flat.items():
        if "." in k:
            sec, kk = k.split(".", 1)
            out.setdefault(sec, {})[kk] = v
        else:
            out[k] = v
    return out


# --- values -------------------------------------------------------------------------------------
def parse_value(text: str) -> Any:
    """A ``--set`` value: a TOML literal (``3``, ``0.5``, ``true``, ``[1, 2]``, ``"s"``) or a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return str(text)  # a plain str (never the internal _Raw marker)


def parse_sets(items: Iterable[str]) -> dict[str, Any]:
    """``["a=1", "data.n=2"]`` -> ``{"a": 1, "data.n": 2}``; the raw text is kept for string keys."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        k = k.strip()
        if not k:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        out[k] = _Raw(v.strip())
    return out


class _Raw(str):
    """A value typed on the command line (parsed lazily against the default's type)."""


def _typename(v: Any) -> str:
    return {bool: "bool", int: "int", float: "float", str: "str"}.get(type(v), type(v).__name__)


def _coerce(key: str, value: Any, default: Any) -> Any:
    raw = value if isinstance(value, _Raw) else None
    if raw is not None:
        value = parse_value(raw)
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(default, str):
        if raw is not None:
            return value if isinstance(value, str) else str(raw)
        if isinstance(value, str):
            return value
    elif isinstance(default, list) and isinstance(value, list):
        if default:
            return [_coerce(f"{key}[{i}]", u, default[0]) for i, u in enumerate(value)]
        return value
    raise ConfigError(
        f"{key}: expected {_typename(default)}"
        + (f" (list of {_typename(default[0])})" if isinstance(default, list) and default else "")
        + f", got {value!r} ({_typename(value)})"
    )


def _unknown(key: str, valid: Sequence[str]) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint}; valid keys: {', '.join(valid)}")


def resolve(
    defaults: Mapping[str, Any],
    *,
    file: Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
    choices: Mapping[str, Sequence[Any]] | None = None,
) -> dict[str, Any]:
    """Defaults <- file <- overrides, validated. Returns a fresh nested dict."""
    flat = flatten(defaults)
    valid = list(flat)
    sections = {k for k, v in defaults.items() if isinstance(v, Mapping)}
    updates: list[tuple[str, Any]] = []
    if file:
        for k, v in file.items():
            if isinstance(v, Mapping):
                if k not in sections:
                    raise _unknown(k, valid) if k not in flat else ConfigError(
                        f"{k}: expected a value, got a table")
                updates.extend((f"{k}.{kk}", vv) for kk, vv in v.items())
            else:
                if k in sections:
                    raise ConfigError(f"{k}: is a table ([{k}]); set its keys, e.g. {k}.<key>")
                updates.append((k, v))
    if overrides:
        updates.extend(overrides.items())
    for k, v in updates:
        if k not in flat:
            raise _unknown(k, valid)
        flat[k] = _coerce(k, v, flatten(defaults)[k])
    for k, allowed in (choices or {}).items():
        if k not in flat:
            raise ConfigError(f"choices given for unknown key {k!r}")
        val = flat[k]
        norm = {str(a).lower(): a for a in allowed}
        if str(val).lower() not in norm:
            raise ConfigError(f"{k}: {val!r} is not one of {', '.join(map(str, allowed))}")
        flat[k] = norm[str(val).lower()]
    return unflatten(flat)
