"""Handles on a composition's parts: one adapter's modules and tensors, and the
trainable-parameter report."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


class AdapterHandle:
    """One adapter of a composition: its config and its modules, keyed by site."""

    def __init__(
        self,
        name: str,
        method: str,
        config: Any,
        modules: Mapping[str, nn.Module],
        shared: nn.Module | None,
    ):
        self.name = name
        self.method = method
        self.config = config
        self.modules = dict(modules)
        self.shared = shared

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        seen: set[int] = set()
        for key, module in self.modules.items():
            for pname, p in module.named_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield f"{key}.{pname}", p
        if self.shared is not None:
            for pname, p in self.shared.named_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield f"shared.{pname}", p

    def parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_parameters()]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Architecture-neutral tensors: ``<site key>.<param>`` (e.g. ``layers.0.attn.q.lora_A``)."""
        out: dict[str, torch.Tensor] = {}
        for key, module in self.modules.items():
            for k, v in module.state_dict().items():
                out[f"{key}.{k}"] = v
        if self.shared is not None:
            for k, v in self.shared.state_dict().items():
                out[f"shared.{k}"] = v
        return out

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.state_dict().items()}

    @torch.no_grad()
    def load_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy tensors in (shapes must already be checked); dtype follows the module."""
        targets: dict[str, torch.Tensor] = {}
        for key, module in self.modules.items():
            for k, v in module.state_dict(keep_vars=True).items():
                targets[f"{key}.{k}"] = v
        if self.shared is not None:
            for k, v in self.shared.state_dict(keep_vars=True).items():
                targets[f"shared.{k}"] = v
        for k, t in tensors.items():
            dst = targets[k]
            dst.copy_(
                t.to(device=dst.device, dtype=dst.dtype)
            )  # (not .data: keep version counters honest)

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def __repr__(self) -> str:
        return f"AdapterHandle({self.name!r}, method={self.method!r}, sites={len(self.modules)})"


@dataclass(frozen=True)
class ParameterReport:
    """Trainable parameters per adapter (and per operator with weights), with totals."""

    per_adapter: Mapping[str, int]
    per_operator: Mapping[str, int]
    trainable: int
    base: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.base, 1)

    def __str__(self) -> str:
        rows = [(f"adapter {k}", v) for k, v in self.per_adapter.items()]
        rows += [(f"operator {k}", v) for k, v in self.per_operator.items()]
        width = max([len(r[0]) for r in rows] + [len("base model (frozen)")])
        lines = [f"{name:<{width}}  {n:>12,}" for name, n in rows]
        lines.append(
            f"{'trainable total':<{width}}  {self.trainable:>12,}  ({self.percent:.4f}% of the base)"
        )
        lines.append(f"{'base model (frozen)':<{width}}  {self.base:>12,}")
        return "\n".join(lines)
