"""Regular expressions that may come from untrusted files, matched in bounded time.

Patterns reach the library from targets (``re:<regex>``), PEFT's ``rank_pattern`` /
``alpha_pattern`` keys and IA3's ``feedforward`` list, and so from any adapter directory
a colleague or a hub hands over. Python's :mod:`re` backtracks without limit (a pattern
such as ``([a-z_.0-9]*)*X`` runs for seconds on one module path and grows exponentially),
so every such pattern is compiled and matched here with the `regex
<https://pypi.org/project/regex/>`_ package, whose matcher takes a ``timeout``, with the
same syntax and semantics as :mod:`re` for these patterns:

- a pattern longer than :data:`MAX_LENGTH` characters, or one that does not compile, is
  refused with :class:`PatternError` naming it;
- one match may take at most :data:`MATCH_TIMEOUT` seconds, and matching one pattern
  against all module names of a model at most :data:`BUDGET` seconds in total; past that
  the pattern is refused (:class:`PatternError`, "too slow") instead of hanging the loader.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterable

import regex

from adapter_composer.errors import PatternError

MAX_LENGTH = 1000  # characters of one pattern
MATCH_TIMEOUT = 0.25  # seconds for one match of one pattern against one module path
BUDGET = 2.0  # seconds for one pattern over all the names of one model


@functools.lru_cache(maxsize=4096)
def _compile(pattern: str) -> regex.Pattern:
    return regex.compile(pattern)


def compile_pattern(pattern: str, *, what: str = "pattern") -> regex.Pattern:
    """The compiled ``pattern``; :class:`PatternError` when it is not a string, too long or invalid."""
    if not isinstance(pattern, str):
        raise PatternError(f"{what} must be a string, got {type(pattern).__name__}")
    if len(pattern) > MAX_LENGTH:
        raise PatternError(
            f"{what} {pattern[:40]!r}... is {len(pattern)} characters long; at most {MAX_LENGTH} are accepted"
        )
    try:
        return _compile(pattern)
    except (regex.error, ValueError, OverflowError, RecursionError) as exc:
        raise PatternError(f"{what} {pattern!r} is not a valid regular expression: {exc}") from None


def _too_slow(pattern: str, text: str, what: str) -> PatternError:
    return PatternError(
        f"{what} {pattern!r} took too long to match {text!r} (more than {MATCH_TIMEOUT} s; "
        "nested repetition such as '(a*)*' backtracks exponentially); simplify the pattern"
    )


def _timeout(deadline: float | None) -> float:
    if deadline is None:
        return MATCH_TIMEOUT
    return max(min(MATCH_TIMEOUT, deadline - time.monotonic()), 1e-3)


def fullmatch(
    pattern: str, text: str, *, what: str = "pattern", deadline: float | None = None
) -> bool:
    """Whether ``pattern`` matches the whole of ``text`` (``re.fullmatch``), in bounded time."""
    rx = compile_pattern(pattern, what=what)
    try:
        return rx.fullmatch(text, timeout=_timeout(deadline)) is not None
    except TimeoutError:
        raise _too_slow(pattern, text, what) from None


def matches_suffix(
    key: str, path: str, *, what: str = "pattern key", deadline: float | None = None
) -> bool:
    """PEFT's rule for ``rank_pattern`` / ``alpha_pattern`` keys: ``key`` matches the end of
    ``path`` at a ``.`` boundary, ``re.match(rf"(.*\\.)?({key})$", path)``, in bounded time."""
    compile_pattern(key, what=what)  # the key alone must be valid (its error names the key)
    rx = compile_pattern(rf"(.*\.)?({key})$", what=what)
    try:
        return rx.match(path, timeout=_timeout(deadline)) is not None
    except TimeoutError:
        raise _too_slow(key, path, what) from None


def match(pattern: str, text: str, *, what: str = "pattern") -> regex.Match | None:
    """``re.match(pattern, text)`` in bounded time (the match, or None)."""
    rx = compile_pattern(pattern, what=what)
    try:
        return rx.match(text, timeout=MATCH_TIMEOUT)
    except TimeoutError:
        raise _too_slow(pattern, text, what) from None


def filter_fullmatch(pattern: str, names: Iterable[str], *, what: str = "pattern") -> list[str]:
    """The names ``pattern`` matches in full, spending at most :data:`BUDGET` seconds in all."""
    compile_pattern(pattern, what=what)
    deadline = time.monotonic() + BUDGET
    out = []
    for name in names:
        if time.monotonic() > deadline:
            raise PatternError(
                f"{what} {pattern!r} took more than {BUDGET} s to match this model's module names; "
                "simplify the pattern"
            )
        if fullmatch(pattern, name, what=what, deadline=deadline):
            out.append(name)
    return out


__all__ = [
    "BUDGET",
    "MATCH_TIMEOUT",
    "MAX_LENGTH",
    "compile_pattern",
    "filter_fullmatch",
    "fullmatch",
    "match",
    "matches_suffix",
]
