"""Model-level sites: virtual tokens prepended to the input (prompt) or to every layer's keys and
values (prefix), and the top-level forward hooks that inject them and begin each call's state
(:mod:`adapter_composer.runtime.state`).

Both families work on *segments*: ``values`` [B, n, ...] with a ``valid`` mask [B, n]. A
stack concatenates its children's segments in order (``[P_a; P_b; x]``); a route picks one
child's segments per row and pads shorter ones with masked slots. Method modules return
their virtual tokens for one example:

    input.embeddings      forward() -> [n, d_model]
    attention.kv_prefix   forward() -> [n, num_layers, 2, num_kv_heads, head_dim]

The hook follows HF PEFT's conventions: prompts are prepended to ``inputs_embeds`` (the
attention mask gets ones, labels get -100, token types get 0); prefixes fill a fresh
``DynamicCache`` before the first real token, so real tokens take positions n, n+1, ...
During ``generate()`` the cache remembers how many virtual positions it holds and later
steps extend the attention mask and shift the position ids accordingly, so the KV cache
is kept and the prefix is computed once.
"""

from __future__ import annotations

import contextvars
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from adapter_composer.errors import ArgumentError, RoutingError
from adapter_composer.sites import SiteInfo

from .state import CallScope, CallState, StatefulCheckpoint
from .switch import adapters_off

VIRTUAL = "_adapter_composer_virtual"  # attribute set on caches that hold virtual positions
ROUTE: contextvars.ContextVar[tuple | str | None] = contextvars.ContextVar("adapter_composer_route", default=None)
GENERATING: contextvars.ContextVar[bool] = contextvars.ContextVar("adapter_composer_generating", default=False)
CACHE_FIELDS = ("cache", "past_key_values")  # the KV cache's name in model outputs (transformers 5.24 / before)


@dataclass
class Segments:
    values: torch.Tensor  # [B, n, ...]
    valid: torch.Tensor | None = None  # [B, n] bool; None: every slot is valid

    @property
    def length(self) -> int:
        return int(self.values.shape[1])

    def mask(self) -> torch.Tensor:
        if self.valid is not None:
            return self.valid
        return torch.ones(self.values.shape[:2], dtype=torch.bool, device=self.values.device)


def segments_stack(parts: Sequence[Segments | None]) -> Segments | None:
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    values = torch.cat([p.values for p in parts], dim=1)
    valid = None if all(p.valid is None for p in parts) else torch.cat([p.mask() for p in parts], dim=1)
    return Segments(values, valid)


class SegmentCall:
    __slots__ = ("batch", "state", "dtype", "device")

    def __init__(self, batch: int, state: CallState | None, dtype: torch.dtype, device: torch.device):
        self.batch = batch
        self.state = state
        self.dtype = dtype
        self.device = device


class SegmentLeaf(nn.Module):
    """One adapter's virtual tokens."""

    def __init__(self, adapter: str, kind: str, module: nn.Module, info: SiteInfo):
        super().__init__()
        self.adapter = adapter
        self.kind = kind
        self.op = module
        self.key = info.key

    def segments(self, call: SegmentCall) -> Segments:
        tokens = self.op().to(call.dtype)
        return Segments(tokens.unsqueeze(0).expand(call.batch, *tokens.shape))

    def extra_repr(self) -> str:
        return f"adapter={self.adapter!r}, kind={self.kind}"


class SegmentSite(nn.Module):
    """The program of a model-level family (prompt or prefix)."""

    def __init__(self, family: str, program: nn.Module):
        super().__init__()
        self.family = family
        self.program = program
        self.active = True

    def segments(self, call: SegmentCall) -> Segments | None:
        if not self.active:
            return None
        return self.program.segments(call)


def _batch_size(kwargs: dict) -> int:
    # encoder-decoder generation passes the encoder's output and decoder ids instead of input_ids
    for key in ("input_ids", "inputs_embeds", "decoder_input_ids", "decoder_inputs_embeds"):
        value = kwargs.get(key)
        if value is not None:
            return int(value.shape[0])
    encoded = kwargs.get("encoder_outputs")
    if encoded is not None:
        return int(encoded[0].shape[0])
    raise RoutingError("the forward call has neither input_ids nor inputs_embeds")


def _positional_index(model: nn.Module, name: str) -> int | None:
    """Where ``name`` sits among the forward's positional parameters (None: keyword only)."""
    import inspect

    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    for i, p in enumerate(params):
        if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            return None
        if p.name == name:
            return i
    return None


def _cache_keyword(model: nn.Module) -> str:
    """The forward keyword of the KV cache: ``cache`` from transformers 5.24, ``past_key_values`` before."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def _checkpointing(model: nn.Module) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def _returned_cache(output: Any) -> Any:
    if isinstance(output, Mapping):
        for name in CACHE_FIELDS:
            value = output.get(name)
            if value is not None:
                return value
    return None


def _without(output: Any, cache: Any) -> Any:
    """``output`` without the KV cache ``cache`` (a model output, or a tuple holding it)."""
    if isinstance(output, Mapping) and hasattr(output, "to_tuple"):
        fields = {k: v for k, v in output.items() if v is not cache}
        return type(output)(**fields)
    if isinstance(output, tuple):
        return tuple(item for item in output if item is not cache)
    return output


def _prepend(t: torch.Tensor | None, block: torch.Tensor) -> torch.Tensor | None:
    return None if t is None else torch.cat([block.to(t.dtype), t], dim=1)


class ModelHook:
    """Top-level forward hooks: consume ``route=``, begin the call's state, inject prompts and
    prefixes (pre-hook, ``__call__``); hand the call's keys and gates to the KV cache it
    returns, and drop a cache the caller did not ask for (post-hook, :meth:`after`)."""

    def __init__(
        self,
        model: nn.Module,
        scope: CallScope,
        prompt: SegmentSite | None,
        prefix: SegmentSite | None,
        geometry: Any,
        route_keys: frozenset[str],
    ):
        self.model = model
        self.scope = scope
        self.prompt = prompt
        self.prefix = prefix
        self.geometry = geometry
        self.route_keys = route_keys
        self.cache_key = _cache_keyword(model)
        self.mask_index = _positional_index(model, "attention_mask")
        # an encoder-decoder's attention_mask is the encoder's: not the tokens its decoder sites see
        self.masks_tokens = not getattr(getattr(model, "config", None), "is_encoder_decoder", False)
        self.composed: Any = None  # the Composed handle (set by it; adapter_composer.Composed.of)
        self.checkpointable = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]

    # --- routing ------------------------------------------------------------------------

    def _route(self, keys: Any, batch: int) -> tuple[str | None, ...] | None:
        if keys is None:
            return None
        if not self.route_keys:
            raise RoutingError("route= was given, but this composition has no route node")
        if isinstance(keys, str):
            keys = [keys] * batch
        if not isinstance(keys, list | tuple):
            raise RoutingError(f"route= takes a key or a list of keys (one per row), not {type(keys).__name__}")
        keys = tuple(None if k is None else str(k) for k in keys)
        if len(keys) != batch and keys and GENERATING.get() and batch % len(keys) == 0:
            # generate() repeats each row for its beams / returned sequences (repeat_interleave)
            factor = batch // len(keys)
            keys = tuple(k for k in keys for _ in range(factor))
        if len(keys) != batch:
            raise RoutingError(f"route= has {len(keys)} keys for a batch of {batch} rows")
        unknown = sorted({k for k in keys if k is not None and k not in self.route_keys})
        if unknown:
            raise RoutingError(f"unknown route keys {unknown}; this composition routes {sorted(self.route_keys)}")
        return keys

    def _begin(self, given: Any, batch: int, cache: Any, past: int) -> CallState:
        """The call's state: keys given to the call, else those its KV cache carries, else the
        routing context's; per-sequence gates carried by the cache when it continues one."""
        carried = self.scope.carried(cache) if past > 0 else None
        if given is None:
            given = carried.route if carried is not None else ROUTE.get()
        state = self.scope.begin(self._route(given, batch), past > 0, carried)
        if self.model.training and torch.is_grad_enabled():
            self._checkpoint_in_state()
        return state

    def _checkpoint_in_state(self) -> None:
        """Make checkpointed layers recompute in the state of the call that ran them."""
        for module in self.checkpointable:
            func = getattr(module, "_gradient_checkpointing_func", None)
            if module.gradient_checkpointing and func is not None and not isinstance(func, StatefulCheckpoint):
                module._gradient_checkpointing_func = StatefulCheckpoint(func, self.scope)

    def release(self) -> None:
        """Undo :meth:`_checkpoint_in_state` (when the composition is undone)."""
        for module in self.checkpointable:
            func = getattr(module, "_gradient_checkpointing_func", None)
            if isinstance(func, StatefulCheckpoint) and func.scope is self.scope:
                module._gradient_checkpointing_func = func.inner

    # --- the hooks ----------------------------------------------------------------------

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        route = kwargs.pop("route", None)
        cache = kwargs.get(self.cache_key, kwargs.get("past_key_values"))
        past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
        if (self.prompt is None and self.prefix is None) or adapters_off(self.scope):
            first = args[0] if args and isinstance(args[0], torch.Tensor) else None
            batch = int(first.shape[0]) if first is not None else _batch_size(kwargs)
            state = self._begin(route, batch, cache, past)
            state.running = "model"
            mask = kwargs.get("attention_mask")
            if mask is None and self.mask_index is not None and len(args) > self.mask_index:
                mask = args[self.mask_index]
            self._record_mask(state, mask)
            return args, kwargs
        if args:
            if len(args) > 1 or "input_ids" in kwargs:
                raise ArgumentError("pass the model's inputs as keyword arguments (input_ids=..., attention_mask=...)")
            kwargs = {"input_ids": args[0], **kwargs}
        batch = _batch_size(kwargs)
        state = self._begin(route, batch, cache, past)
        state.running = "model"
        if past == 0:
            self._first(kwargs, batch, cache, state)
        else:
            self._later(kwargs, cache, past)
        self._record_mask(state, kwargs.get("attention_mask"))
        return (), kwargs

    def _record_mask(self, state: CallState, mask: Any) -> None:
        """Which tokens are real, for per-sequence pooling (a 2-D mask over past + current tokens)."""
        if self.masks_tokens and isinstance(mask, torch.Tensor) and mask.dim() == 2:
            state.attention_mask = mask

    def after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        state = self.scope.current()
        if state is None:
            return None
        state.running = None
        if not torch.is_grad_enabled():  # no backward will recompute anything: free the memos
            state.cache.clear()
            state.block_inputs.clear()
        if state.drop_cache is not None:
            return _without(output, state.drop_cache)
        cache = _returned_cache(output)
        if cache is not None:
            self.scope.carry(cache, state)
        return None

    def encoder_before(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Pre-hook on an encoder-decoder's encoder: ``generate()`` runs the encoder on its own,
        outside the model's forward, so such a run begins a call (keys from the routing
        context, as ``generate(route=...)`` sets them); inside the model's forward it does nothing."""
        current = self.scope.current()
        if current is not None and current.running is not None:
            return
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        batch = int(first.shape[0]) if first is not None else _batch_size(kwargs)
        state = self._begin(None, batch, None, 0)
        state.running = "encoder"
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:  # the encoder's own tokens
            state.attention_mask = mask

    def encoder_after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        current = self.scope.current()
        if current is not None and current.running == "encoder":
            current.running = None

    def _first(self, kwargs: dict, batch: int, cache: Any, state: CallState) -> None:
        if self.prefix is not None and self.prefix.active and self.model.training and _checkpointing(self.model):
            from adapter_composer.errors import ComposerError

            raise ComposerError(
                "prefix tuning cannot train under gradient checkpointing: transformers' checkpointed layers "
                "drop the key/value cache that holds the prefix. Call model.gradient_checkpointing_disable() "
                "(prompt tuning and the other methods are not affected)."
            )
        embed = self.model.get_input_embeddings()
        dtype, device = embed.weight.dtype, embed.weight.device
        call = SegmentCall(batch, state, dtype, device)
        prefix = self.prefix.segments(call) if self.prefix is not None else None
        prompt = self.prompt.segments(call) if self.prompt is not None else None
        if prefix is None and prompt is None:
            return
        ids = kwargs.get("input_ids")
        length = int((ids if ids is not None else kwargs["inputs_embeds"]).shape[1])
        parts = [s.mask() for s in (prefix, prompt) if s is not None]
        virtual_mask = torch.cat(parts, dim=1)
        padded = not bool(virtual_mask.all())
        if prompt is not None:
            embeds = kwargs.pop("inputs_embeds", None)
            if embeds is None:
                embeds = embed(kwargs.pop("input_ids"))
            kwargs["input_ids"] = None
            tokens = prompt.values.to(embeds.dtype)
            if prompt.valid is not None:
                tokens = tokens * prompt.valid[..., None].to(tokens.dtype)
            kwargs["inputs_embeds"] = torch.cat([tokens, embeds], dim=1)
            n = prompt.length
            if kwargs.get("labels") is not None:
                kwargs["labels"] = _prepend(kwargs["labels"], torch.full((batch, n), -100, device=device))
            if kwargs.get("token_type_ids") is not None:
                kwargs["token_type_ids"] = _prepend(kwargs["token_type_ids"], torch.zeros(batch, n, dtype=torch.long, device=device))
        if prefix is not None:
            made = cache is None
            cache = self._fill_cache(cache, prefix)
            kwargs.pop("past_key_values", None)
            kwargs[self.cache_key] = cache
            if made and not self._use_cache(kwargs):
                state.drop_cache = cache  # the prefix needs a cache; the caller asked for none back
        mask = kwargs.get("attention_mask")
        real = mask if mask is not None else torch.ones(batch, length, dtype=torch.long, device=device)
        kwargs["attention_mask"] = torch.cat([virtual_mask.to(real.dtype), real], dim=1)
        given = kwargs.get("position_ids")
        if padded or given is not None:
            kwargs["position_ids"] = self._positions(given, prefix, prompt, batch, length, device)
        if cache is not None or prefix is not None:
            target = kwargs.get(self.cache_key, kwargs.get("past_key_values"))
            if target is not None:
                setattr(target, VIRTUAL, virtual_mask)

    def _use_cache(self, kwargs: dict) -> bool:
        given = kwargs.get("use_cache")
        if given is not None:
            return bool(given)
        return bool(getattr(getattr(self.model, "config", None), "use_cache", True))

    def _fill_cache(self, cache: Any, prefix: Segments) -> Any:
        from transformers import DynamicCache

        if cache is None:
            cache = DynamicCache(config=self.model.config)
        values = prefix.values  # [B, n, L, 2, H, hd]
        for layer in range(values.shape[2]):
            k = values[:, :, layer, 0].transpose(1, 2)  # [B, H, n, hd]
            v = values[:, :, layer, 1].transpose(1, 2)
            cache.update(k, v, layer)
        return cache

    @staticmethod
    def _positions(given, prefix, prompt, batch, length, device) -> torch.Tensor:
        """Explicit positions: valid virtual slots count up from 0, real tokens follow them."""
        offset = torch.zeros(batch, dtype=torch.long, device=device)
        if prefix is not None:
            offset = offset + prefix.mask().long().sum(1)
        blocks = []
        if prompt is not None:
            valid = prompt.mask().long()
            blocks.append(((valid.cumsum(1) - 1).clamp(min=0) + offset[:, None]) * valid)
            offset = offset + valid.sum(1)
        base = given if given is not None else torch.arange(length, device=device).expand(batch, length)
        blocks.append(base + offset[:, None])
        return torch.cat(blocks, dim=1)

    def _later(self, kwargs: dict, cache: Any, past: int) -> None:
        virtual = getattr(cache, VIRTUAL, None)
        if virtual is None:
            return
        v = int(virtual.shape[1])
        ids = kwargs.get("input_ids")
        length = int((ids if ids is not None else kwargs["inputs_embeds"]).shape[1])
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2 and mask.shape[1] + v == past + length:
            kwargs["attention_mask"] = torch.cat([virtual.to(mask.dtype), mask], dim=1)
        counts = virtual.long().sum(1)
        given = kwargs.get("position_ids")
        if given is not None:
            kwargs["position_ids"] = given + counts[:, None]
        elif not bool(virtual.all()):
            start = past - v
            base = torch.arange(start, start + length, device=counts.device)
            kwargs["position_ids"] = base[None, :] + counts[:, None]
