"""Per-call state shared by the sites of one composition: routing keys, gates, aux losses.

It belongs to one :class:`adapter_composer.Composed` (never global). The top-level forward hook sets
it at the start of each call and it stays until the next call, so that activation
checkpointing, which re-runs parts of the forward during backward, sees the same routing.
A call that continues a KV cache (a later ``generate()`` step) keeps the previous call's
routing keys when none are given, and keeps per-sequence gates computed at the prefill.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class CallState:
    route: tuple[str | None, ...] | None = None  # one key per batch row, None = base model
    record_gates: bool = False
    gates: dict[str, torch.Tensor] = field(default_factory=dict)  # "node@site" -> gate values of the last call
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)  # "node@site" -> weighted balancing loss
    cache: dict[Any, Any] = field(default_factory=dict)  # per-call memo (e.g. row groups per route node)
    sticky: dict[Any, Any] = field(default_factory=dict)  # kept while a generation continues its cache
    block_inputs: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> its input (when asked for)
    continuing: bool = False

    def begin(self, route: tuple[str | None, ...] | None, continuing: bool = False) -> None:
        if continuing and route is None:
            route = self.route
        if not continuing:
            self.sticky = {}
        self.route = route
        self.continuing = continuing
        self.gates = {}
        self.aux_losses = {}
        self.cache = {}
        self.block_inputs = {}
