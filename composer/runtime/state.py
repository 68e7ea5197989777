"""Per-call state: routing keys, gates, balancing losses and memos of one forward call.

A composition owns one :class:`CallScope`; every site and operator is built with it and reads
the state of the call in progress through it, ``scope.current()``. The state itself belongs
to the call: the top-level forward hook makes a fresh :class:`CallState` for each call and
makes it current in the caller's :mod:`contextvars` context, so concurrent calls from several
threads or asyncio tasks never see each other's keys, gates or memos.

    thread / task          the state of its latest call (until its next call)
    checkpoint recompute   the state of the call whose layer it recomputes (re-entered
                           explicitly, whichever thread autograd runs it on)
    KV-cache continuation  the routing keys and per-sequence gates of the call that filled
                           the cache, carried on the cache object itself

The state stays current after the call returns, so ``composed.aux_loss()`` and activation
checkpointing in the same thread or task read it. Nothing here is global: two compositions,
or a composition and its deep copy, have separate scopes.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from adapter_composer.errors import ComposerError

CARRY = "_adapter_composer_carry"  # attribute on a KV cache: {scope token: Carried}
_TOKENS = itertools.count()


@dataclass
class CallState:
    """Everything one forward call's sites share (made by the top-level hook, never reused)."""

    route: tuple[str | None, ...] | None = None  # one key per batch row, None = base model
    continuing: bool = False  # the call continues a KV cache (a later generate() step)
    record_gates: bool = False
    gates: dict[str, torch.Tensor] = field(default_factory=dict)  # "node@site" -> gates (a record_gates() dict)
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)  # "node@site" -> weighted balancing loss
    cache: dict[Any, Any] = field(default_factory=dict)  # per-call memo (row groups per route node, sublayer inputs)
    sticky: dict[Any, Any] = field(default_factory=dict)  # kept while a generation continues its cache
    block_inputs: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> its input (when asked for)
    attention_mask: torch.Tensor | None = None  # [B, past + T], nonzero = a real token (2-D masks only)
    drop_cache: Any = None  # a KV cache the hook made although use_cache=False: not returned
    running: str | None = None  # "model" during the top-level forward, "encoder" during a lone encoder run

    def real_tokens(self, rows: torch.Tensor | None, batch: int, length: int) -> torch.Tensor | None:
        """Which of the call's current tokens are real, [batch, length] bool, for rows ``rows``
        of the call's batch (None: all); None when the call gave no 2-D attention mask.

        The current tokens are the mask's last ``length`` columns (earlier ones are cached)."""
        mask = self.attention_mask
        if mask is None:
            return None
        if rows is not None:
            mask = mask.index_select(0, rows.to(mask.device))
        if mask.shape[0] != batch or mask.shape[1] < length:
            raise ComposerError(
                f"the attention mask has shape {tuple(mask.shape)} but a site sees {batch} rows × {length} tokens; "
                "call the composed model itself (its top-level forward), not one of its submodules"
            )
        return mask[:, mask.shape[1] - length :] != 0


@dataclass
class Carried:
    """What a KV cache carries to the calls that continue it: keys and per-sequence gates."""

    route: tuple[str | None, ...] | None
    sticky: dict[Any, Any]


def not_picklable(what: str) -> ComposerError:
    return ComposerError(
        f"{what} of a composed model cannot be pickled (torch.save(model), pickle, multiprocessing): loading a pickle "
        "runs arbitrary code, and this library never unpickles. Save the composition with composed.save(directory) "
        "(safetensors + JSON; adapter_composer.load reads it back onto the base model), save the base model with "
        "save_pretrained, or pickle only model.state_dict(). copy.deepcopy(model) works and gives an independent copy."
    )


class CallScope:
    """Where the sites of one composition find the state of the call in progress.

    ``current()`` is the state of the latest call in this thread or task. Deep copies get a
    fresh scope (the copy's calls are its own); pickling is refused (see :func:`not_picklable`).
    """

    def __init__(self) -> None:
        self.token = next(_TOKENS)  # names this scope on the KV caches it carries state on
        self._current: contextvars.ContextVar[CallState | None] = contextvars.ContextVar(
            f"adapter_composer_call_{self.token}", default=None
        )
        self._recorder: contextvars.ContextVar[dict[str, torch.Tensor] | None] = contextvars.ContextVar(
            f"adapter_composer_gates_{self.token}", default=None
        )

    def current(self) -> CallState | None:
        return self._current.get()

    def begin(
        self, route: tuple[str | None, ...] | None, continuing: bool = False, carried: Carried | None = None
    ) -> CallState:
        """A fresh state for a call, made current in the caller's context."""
        state = CallState(route=route, continuing=continuing)
        if carried is not None:
            state.sticky = carried.sticky
        recorder = self._recorder.get()
        if recorder is not None:
            state.record_gates = True
            state.gates = recorder
        self._current.set(state)
        return state

    @contextlib.contextmanager
    def entered(self, state: CallState | None) -> Iterator[None]:
        """Make ``state`` current for the block (a checkpointed layer's recompute)."""
        token = self._current.set(state)
        try:
            yield
        finally:
            self._current.reset(token)

    @contextlib.contextmanager
    def recording(self) -> Iterator[dict[str, torch.Tensor]]:
        """Calls begun in this context during the block write their gates into the dict."""
        outer = self._recorder.get()
        recorded: dict[str, torch.Tensor] = {}
        token = self._recorder.set(recorded)
        try:
            yield recorded
        finally:
            self._recorder.reset(token)
            if outer is not None:
                outer.update(recorded)

    # --- continuation through a KV cache ---------------------------------------------------

    def carried(self, cache: Any) -> Carried | None:
        table = getattr(cache, CARRY, None)
        return table.get(self.token) if isinstance(table, dict) else None

    def carry(self, cache: Any, state: CallState) -> None:
        """Leave ``state``'s keys and per-sequence gates on ``cache`` for the calls continuing it."""
        if state.route is None and not state.sticky:
            if self.carried(cache) is not None:
                getattr(cache, CARRY).pop(self.token, None)
            return
        table = getattr(cache, CARRY, None)
        if not isinstance(table, dict):
            table = {}
            try:
                setattr(cache, CARRY, table)
            except AttributeError:  # a cache type that takes no attributes: nothing carried
                return
        table[self.token] = Carried(state.route, state.sticky)

    # --- copies -----------------------------------------------------------------------------

    def __deepcopy__(self, memo: dict) -> CallScope:
        return CallScope()

    def __copy__(self) -> CallScope:
        return self

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise not_picklable("the per-call state")

    def __repr__(self) -> str:
        return f"CallScope({self.token})"


class StatefulCheckpoint:
    """Wraps a layer's activation-checkpointing function so that the recompute of the layer
    during backward runs in the state of the call that ran it forward, on whatever thread
    autograd runs it (CUDA runs backward on its own threads) and whatever calls came between."""

    def __init__(self, inner: Any, scope: CallScope):
        self.inner = inner
        self.scope = scope

    def __call__(self, function: Any, *args: Any, **kwargs: Any) -> Any:
        return self.inner(_InState(function, self.scope, self.scope.current()), *args, **kwargs)


class _InState:
    __slots__ = ("function", "scope", "state")

    def __init__(self, function: Any, scope: CallScope, state: CallState | None):
        self.function = function
        self.scope = scope
        self.state = state

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.scope.entered(self.state):
            return self.function(*args, **kwargs)


__all__ = ["CARRY", "CallScope", "CallState", "Carried", "StatefulCheckpoint", "not_picklable"]
