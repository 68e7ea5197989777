"""Typed, strict reads of ``adapter_config.json`` fields, for the methods' PEFT codecs.

A PEFT config comes from a file someone else wrote. ``int(peft["r"])`` turns ``8.5`` into
8, ``bool(peft["use_rslora"])`` turns ``"false"`` and ``-1`` into ``True`` (a different
model, silently), and a list where a number belongs raises a raw ``TypeError``. These
helpers accept only what PEFT itself writes and raise a ``ValueError`` naming the field,
which the reader reports with the file's path:

    peft_int      a JSON integer (not a bool, not 8.0)
    peft_float    a JSON number (not a bool), finite
    peft_bool     true or false
    peft_str      a string (optionally one of ``choices``)
    peft_strings  a string or a list of strings
    peft_dict     an object whose values all have one type (null and a missing key: {})

A missing key gives ``default``; ``null`` gives it too where ``nullable`` (PEFT writes
``null`` for unset optional fields), and is refused otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

REQUIRED: Any = object()


def _get(peft: Mapping[str, Any], key: str, default: Any, nullable: bool) -> tuple[bool, Any]:
    """(found, value): found is False when the default applies."""
    if key not in peft:
        if default is REQUIRED:
            raise ValueError(f"{key} is missing")
        return False, default
    value = peft[key]
    if value is None:
        if nullable and default is not REQUIRED:
            return False, default
        raise ValueError(f"{key} is null; it must be set")
    return True, value


def _shown(value: Any) -> str:
    return f"{value!r:.60}"


def peft_int(
    peft: Mapping[str, Any], key: str, default: Any = REQUIRED, *, minimum: int | None = None, nullable: bool = False
) -> int:
    found, value = _get(peft, key, default, nullable)
    if not found:
        return value
    if type(value) is not int:
        raise ValueError(f"{key} must be an integer, got {_shown(value)}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{key} must be >= {minimum}, got {value}")
    return value


def peft_float(
    peft: Mapping[str, Any],
    key: str,
    default: Any = REQUIRED,
    *,
    minimum: float | None = None,
    below: float | None = None,
    nullable: bool = False,
) -> float:
    found, value = _get(peft, key, default, nullable)
    if not found:
        return value
    if type(value) not in (int, float) or not math.isfinite(value):
        raise ValueError(f"{key} must be a finite number, got {_shown(value)}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{key} must be >= {minimum}, got {value}")
    if below is not None and value >= below:
        raise ValueError(f"{key} must be < {below}, got {value}")
    return float(value)


def peft_bool(peft: Mapping[str, Any], key: str, default: Any = REQUIRED, *, nullable: bool = False) -> bool:
    found, value = _get(peft, key, default, nullable)
    if found and type(value) is not bool:
        raise ValueError(f"{key} must be true or false, got {_shown(value)}")
    return value


def peft_str(
    peft: Mapping[str, Any],
    key: str,
    default: Any = REQUIRED,
    *,
    choices: tuple[str, ...] | None = None,
    nullable: bool = True,
) -> str | None:
    found, value = _get(peft, key, default, nullable)
    if not found:
        return value
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a string, got {_shown(value)}")
    if choices is not None and value not in choices:
        raise ValueError(f"{key} must be one of {list(choices)}, got {_shown(value)}")
    return value


def peft_strings(peft: Mapping[str, Any], key: str, default: Any = REQUIRED, *, nullable: bool = True) -> str | list[str]:
    """A string (PEFT: a regex) or a list of strings (PEFT: names)."""
    found, value = _get(peft, key, default, nullable)
    if not found or isinstance(value, str):
        return value
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{key} must be a string or a list of strings, got {_shown(value)}")
    return list(value)


def peft_dict(peft: Mapping[str, Any], key: str, kind: type) -> dict[str, Any]:
    """An object of ``kind`` values (``float`` also accepts integers; ``list`` any list)."""
    found, value = _get(peft, key, {}, True)
    if not found:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{key} must be an object, got {_shown(value)}")
    out = {}
    for k, v in value.items():
        if kind is float:
            ok = type(v) in (int, float) and math.isfinite(v)
            v = float(v) if ok else v
        else:
            ok = type(v) is kind
        if not ok:
            raise ValueError(f"{key}[{k!r}] must be {'a finite number' if kind is float else kind.__name__}, got {_shown(v)}")
        out[k] = v
    return out


__all__ = ["REQUIRED", "peft_bool", "peft_dict", "peft_float", "peft_int", "peft_str", "peft_strings"]
