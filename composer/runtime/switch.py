"""Turning a composition off for the calls of one context, without undoing it.

``with composed.disable_adapter(): model(**batch)`` runs the base model: every site of that
composition returns its base module's output. The switch is a :class:`contextvars.ContextVar`
holding the compositions switched off, so it holds for the current thread (or asyncio task)
only: another thread calling the same model meanwhile still gets the adapted outputs.

A composition is named by its per-call state object (``site.state``), which every one of its
sites and its model hook share and no other composition does.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

_OFF: contextvars.ContextVar[frozenset[int]] = contextvars.ContextVar(
    "adapter_composer_disabled", default=frozenset()
)


def adapters_off(owner: Any) -> bool:
    """Whether the composition owning ``owner`` (its call state) is switched off here."""
    off = _OFF.get()
    return bool(off) and id(owner) in off


@contextlib.contextmanager
def switched_off(owner: Any) -> Iterator[None]:
    """Switch the composition owning ``owner`` off for the calls made inside the block."""
    token = _OFF.set(_OFF.get() | {id(owner)})
    try:
        yield
    finally:
        _OFF.reset(token)


__all__ = ["adapters_off", "switched_off"]
