"""LoftQ's initialisation and runtime modules (the method's plugin is :mod:`.loftq`).

``loftq_init`` alternates normal-float quantisation of W − s·BA with a rank-r SVD of the
residual (Li et al., 2023); ``LoftQ`` is the low-rank delta on top of the quantised base,
``QuantizedLinear`` the base layer that runs on deq(Q), ``QuantizedLinearSite`` the site
that refuses to merge into a normal-float weight."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adapter_composer.errors import ComposerError
from adapter_composer.plugins.quantize import dequantize, quantize
from adapter_composer.runtime.linear import LinearSite
from adapter_composer.sites import linear_shape

# --- the initialisation ----------------------------------------------------------------


def low_rank_split(residual: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(L [out, r], R [r, in]) with L R the best rank-r approximation: L = U_r √S_r, R = √S_r V_rᵀ."""
    u, s, vh = torch.linalg.svd(residual, full_matrices=False)
    root = s[:r].sqrt()
    return u[:, :r] * root, root[:, None] * vh[:r]


@dataclass
class LoftqInit:
    codes: torch.Tensor  # uint8 [out·in·bits/8]
    absmax: torch.Tensor  # float32 [out·in / block_size]
    dequantized: torch.Tensor  # float32 [out, in]
    lora_A: torch.Tensor  # [r, in]
    lora_B: torch.Tensor  # [out, r]


@torch.no_grad()
def loftq_init(
    weight: torch.Tensor,
    bits: int,
    r: int,
    iters: int = 1,
    block_size: int = 64,
    scale: float = 1.0,
) -> LoftqInit:
    """The alternating LoftQ initialisation of ``weight`` [out, in] (computed in float32)."""
    if r > min(weight.shape):
        raise ValueError(f"rank {r} exceeds the smaller side of a {tuple(weight.shape)} weight")
    w = weight.detach().float()
    target = w.clone()  # W − s·B A, with B A = 0 at first
    for i in range(iters):
        codes, absmax = quantize(target, bits, block_size)
        deq = dequantize(codes, absmax, w.shape, bits, block_size)
        low, high = low_rank_split(w - deq, r)
        if i + 1 < iters:
            target = w - low @ high
    root = math.sqrt(scale)
    return LoftqInit(codes, absmax, deq, high / root, low / root)


# --- runtime modules --------------------------------------------------------------------


class LoftQ(nn.Module):
    """Δ(x) = s · B A dropout(x) on top of the quantised base deq(Q) held in ``codes``/``absmax``."""

    def __init__(self, init: LoftqInit, scale: float, bits: int, block_size: int, dropout: float):
        super().__init__()
        self.register_buffer("codes", init.codes)
        self.register_buffer("absmax", init.absmax)
        self.lora_A = nn.Parameter(init.lora_A.contiguous())
        self.lora_B = nn.Parameter(init.lora_B.contiguous())
        self.scale = scale
        self.bits = bits
        self.block_size = block_size
        self.shape = tuple(init.dequantized.shape)  # (out, in)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def dequantized(self) -> torch.Tensor:
        """deq(Q) [out, in], float32."""
        return dequantize(self.codes, self.absmax, self.shape, self.bits, self.block_size)

    def forward(self, x: torch.Tensor, site: Any) -> torch.Tensor:
        return F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scale

    def delta_weight(self, site: Any) -> torch.Tensor:
        """s · B A, relative to the site's (quantised) base."""
        return (self.lora_B @ self.lora_A) * self.scale

    def extra_repr(self) -> str:
        return f"r={self.lora_A.shape[0]}, scale={self.scale:g}, nf{self.bits}, block={self.block_size}"


class QuantizedLinear(nn.Module):
    """The base layer of a LoftQ site: y = deq(Q) x + b.

    The rows each LoftQ op owns (all of them, or its slice of a fused layer) are dequantised
    from that op's buffers at every call; rows no LoftQ op owns keep the original weight.
    The original bias (and weight, for such rows) are the original module's own frozen
    parameters, not copies.
    """

    def __init__(self, original: nn.Module, parts: list[tuple[tuple[int, int] | None, LoftQ]]):
        super().__init__()
        self.in_features, self.out_features = linear_shape(original)
        spans = sorted(
            ((span or (0, self.out_features), op) for span, op in parts), key=lambda p: p[0]
        )
        for ((_, stop), _), ((start, _), _) in zip(spans, spans[1:], strict=False):
            if start < stop:
                raise ValueError("two LoftQ ops quantise the same rows of one layer")
        self._parts = tuple(spans)  # references: the ops live in the site's program
        self.transposed = not isinstance(original, nn.Linear)  # transformers' Conv1D: [in, out]
        covered = sum(stop - start for (start, stop), _ in spans)
        self.register_parameter("rest", original.weight if covered < self.out_features else None)
        self.register_parameter("bias", getattr(original, "bias", None))

    def _rest_rows(self, start: int, stop: int) -> torch.Tensor:
        w = self.rest.t() if self.transposed else self.rest
        return w[start:stop].float()

    def dequantized_weight(self) -> torch.Tensor:
        """The weight the site runs on, [out, in], float32."""
        pieces, at = [], 0
        for (start, stop), op in self._parts:
            if start > at:
                pieces.append(self._rest_rows(at, start))
            pieces.append(op.dequantized())
            at = stop
        if at < self.out_features:
            pieces.append(self._rest_rows(at, self.out_features))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        rows = ", ".join(f"[{a}:{b}] nf{op.bits}" for (a, b), op in self._parts)
        return f"in_features={self.in_features}, out_features={self.out_features}, quantised rows {rows}"


class QuantizedLinearSite(LinearSite):
    """A linear site whose base is a :class:`QuantizedLinear`; ops see deq(Q) as the base weight."""

    def original_weight(self) -> torch.Tensor:
        return self.base.dequantized_weight()

    def merge(self) -> None:
        raise ComposerError(
            f"site {self.path!r} runs on a LoftQ-quantised base: folding s·B A into a "
            "normal-float weight is not exact, so it is never merged"
        )


__all__ = ["LoftQ", "LoftqInit", "QuantizedLinear", "QuantizedLinearSite", "loftq_init", "low_rank_split"]
