"""Per-call state shared by the sites of one composition: routing keys, gate records, aux losses.

It belongs to one :class:`composer.Composed` (never global). The top-level forward hook sets
it at the start of each call and it stays until the next call, so that activation
checkpointing, which re-runs parts of the forward during backward, sees the same routing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class CallState:
    route: tuple[str | None, ...] | None = None  # one key per batch row, None = base model
    record_gates: bool = False
    gates: dict[str, torch.Tensor] = field(default_factory=dict)
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    cache: dict[Any, Any] = field(
        default_factory=dict
    )  # per-call memo (e.g. row groups per route node)

    def begin(self, route: tuple[str | None, ...] | None) -> None:
        self.route = route
        self.gates = {}
        self.aux_losses = {}
        self.cache = {}
