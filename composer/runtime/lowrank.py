"""Batched low-rank kernels for route and mix over many LoRA-type adapters.

A method module may expose ``lowrank() -> (A [r, in], B [out, r], scale) | None`` when its
delta is exactly ``scale · B A x`` at the moment (LoRA without active dropout; VeRA and
AdaLoRA can too). Route and mix then avoid a Python loop over adapters:

* route (one adapter per row): stack every adapter's A and B (zero-padded to the largest
  rank; padding adds exact zeros), gather one per row, and run two batched matmuls;
* mix (a gate per token): concatenate the A's and B's, scale the r-dimensional hidden
  activations by each expert's gate, two GEMMs whatever the number of experts.

The stacked tensors are cached while no adapter weight changes (checked through tensor
identities and version counters; the cache holds the tensors it names, so an identity is
never reused while it is cached), so serving does not re-stack on every call. Methods
whose factors are computed per call (VeRA's λ-scaled projections, AdaLoRA's A ⊙ E) get
new tensors each time: always a miss, never a stale hit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def lowrank_of(leaf: nn.Module) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """(A, B, scale) of a linear leaf, or None when it is not a plain low-rank delta now."""
    if getattr(leaf, "kind", None) != "linear.delta" or leaf.out_slice is not None:
        return None
    fn = getattr(leaf.op, "lowrank", None)
    return fn() if fn is not None else None


class LowRankBank:
    """Stacked A [n+1, r, in], B [n+1, out, r] (slot n is all zeros: "no adapter")."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._held: tuple = ()  # the tensors the key names, kept alive so their ids stay theirs
        self.a: torch.Tensor | None = None
        self.b: torch.Tensor | None = None

    @staticmethod
    def _signature(parts: Sequence[tuple[torch.Tensor, torch.Tensor, float]]) -> tuple:
        return tuple((id(a), a._version, id(b), b._version, s, a.shape[0]) for a, b, s in parts)

    def get(self, parts: Sequence[tuple[torch.Tensor, torch.Tensor, float]]) -> tuple[torch.Tensor, torch.Tensor]:
        caching = not torch.is_grad_enabled() or not any(a.requires_grad or b.requires_grad for a, b, _ in parts)
        key = self._signature(parts) if caching else None
        if caching and key == self._key and self.a is not None:
            return self.a, self.b
        a, b = stack_lowrank(parts)
        if caching:
            self._key, self.a, self.b = key, a, b
            self._held = tuple(t for p in parts for t in p[:2])
        else:
            self._key = self.a = self.b = None
            self._held = ()
        return a, b


def stack_lowrank(parts: Sequence[tuple[torch.Tensor, torch.Tensor, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """A [n+1, r_max, in] and B·scale [n+1, out, r_max], zero-padded, with a zero last slot."""
    r_max = max(a.shape[0] for a, _, _ in parts)
    fan_in, fan_out = parts[0][0].shape[1], parts[0][1].shape[0]
    ref = parts[0][0]
    rows_a, rows_b = [], []
    for a, b, s in parts:
        pad = r_max - a.shape[0]
        rows_a.append(a if pad == 0 else torch.cat([a, a.new_zeros(pad, fan_in)], 0))
        bs = b * s
        rows_b.append(bs if pad == 0 else torch.cat([bs, bs.new_zeros(fan_out, pad)], 1))
    rows_a.append(ref.new_zeros(r_max, fan_in))
    rows_b.append(ref.new_zeros(fan_out, r_max))
    return torch.stack(rows_a), torch.stack(rows_b)


def routed_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """Row i gets B[slot[i]] A[slot[i]] x_i (slot = n for rows without an adapter)."""
    a_rows = a.index_select(0, slot)  # [B, r, in]
    b_rows = b.index_select(0, slot)  # [B, out, r]
    flat = x.reshape(x.shape[0], -1, x.shape[-1])  # [B, T, in]
    h = torch.bmm(flat, a_rows.transpose(1, 2))  # [B, T, r]
    y = torch.bmm(h, b_rows.transpose(1, 2))  # [B, T, out]
    return y.reshape(*x.shape[:-1], y.shape[-1])


def mixed_delta(
    x: torch.Tensor, parts: Sequence[tuple[torch.Tensor, torch.Tensor, float]], gates: torch.Tensor
) -> torch.Tensor:
    """Σₑ gₑ(x) sₑ Bₑ Aₑ x with two GEMMs: gates [..., E] broadcast against x's leading dims."""
    a = torch.cat([p[0] for p in parts], 0)  # [Σr, in]
    b = torch.cat([p[1] * p[2] for p in parts], 1)  # [out, Σr]
    ranks = torch.tensor([p[0].shape[0] for p in parts], device=gates.device)
    h = x @ a.t()  # [..., Σr]
    g = torch.repeat_interleave(gates, ranks, dim=-1)  # [..., Σr]
    return (h * g) @ b.t()
