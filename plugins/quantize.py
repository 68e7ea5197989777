"""Block-wise normal-float quantisation (QLoRA's NF4, and its 2- and 8-bit variants) in torch.

A weight is flattened (row-major) and cut into blocks of ``block_size`` consecutive values.
Each block b keeps its absolute maximum m_b and, for every value w, the index of the nearest
entry of a code book T of 2^k values in [-1, 1]:

    code(w) = argmin_j |w / m_b − T_j|        (ties go to the lower j, as torch.argmin)
    deq(w)  = T_code(w) · m_b

The code book is the normal-float type of QLoRA (Dettmers et al. 2023), built from
quantiles of N(0, 1) with one more positive value than negative ones and an exact zero:

    v⁺ = Φ⁻¹(linspace(δ, ½, 2^(k−1) + 1)[:−1]),  v⁻ = −Φ⁻¹(linspace(δ, ½, 2^(k−1))[:−1]),
    T  = sort(v⁺ ∪ {0} ∪ v⁻) / max(v⁺),           δ = 0.9677083

For k = 4 that is exactly bitsandbytes' NF4 table; for k = 2 and 8 it is the table of
PEFT's former ``NFQuantizer`` (the reference of the LoftQ paper's code). The quantiles are
taken in float32 and Φ⁻¹ in float64 before rounding, as those implementations do, so the
tables match theirs bit for bit.

Codes are packed ``8 // k`` to a byte, the first code in the lowest bits (PEFT's "LIFO"
layout: codes [1, 0, 3, 2] at k = 2 pack to 0b10_11_00_01); absmax is kept in float32 per
block (bitsandbytes' ``compress_statistics=False``).
"""

from __future__ import annotations

import functools

import torch

BITS = (2, 4, 8)
NF_OFFSET = 0.9677083


@functools.cache
def _table_cpu(bits: int) -> torch.Tensor:
    half = 2 ** (bits - 1)
    pos = torch.special.ndtri(torch.linspace(NF_OFFSET, 0.5, half + 1)[:-1].double())
    neg = -torch.special.ndtri(torch.linspace(NF_OFFSET, 0.5, half)[:-1].double())
    values = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).float().sort().values
    return values / values.max()


def normal_float_table(bits: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The 2^bits normal-float code values T, sorted, in [-1, 1], float32 (a fresh tensor)."""
    if bits not in BITS:
        raise ValueError(f"normal-float quantisation supports {BITS} bits, not {bits}")
    return _table_cpu(bits).to(device=device, copy=True)


def _check(numel: int, bits: int, block_size: int) -> None:
    if bits not in BITS:
        raise ValueError(f"normal-float quantisation supports {BITS} bits, not {bits}")
    if block_size < 1 or block_size * bits % 8:
        raise ValueError(f"block_size {block_size} does not pack into whole bytes at {bits} bits")
    if numel % block_size:
        raise ValueError(f"{numel} values cannot be cut into blocks of {block_size}")


def nearest_codes(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """argmin_j |x − T_j| for every x (T sorted), in O(numel) memory, as int64.

    The midpoint search gives the right index up to one place of rounding; comparing the
    distances to the neighbours then reproduces ``argmin`` over the whole table exactly.
    """
    mid = (table[1:] + table[:-1]) / 2
    i = torch.searchsorted(mid, x.contiguous())
    last = table.numel() - 1
    cand = torch.stack([(i - 1).clamp(min=0), i, (i + 1).clamp(max=last)], dim=-1)  # [..., 3]
    dist = (x.unsqueeze(-1) - table[cand]).abs()
    return cand.gather(-1, dist.argmin(dim=-1, keepdim=True)).squeeze(-1)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Flat codes (values < 2^bits) → uint8, ``8 // bits`` per byte, the first in the low bits."""
    per = 8 // bits
    groups = codes.reshape(-1, per).to(torch.uint8)  # [n / per, per]
    shifts = torch.arange(per, device=codes.device, dtype=torch.uint8) * bits
    out = torch.zeros(groups.shape[0], dtype=torch.uint8, device=codes.device)
    for j in range(per):
        out |= groups[:, j] << shifts[j]
    return out


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of :func:`pack`: uint8 [n / per] → int64 codes [n]."""
    per = 8 // bits
    mask = (1 << bits) - 1
    shifts = torch.arange(per, device=packed.device, dtype=torch.uint8) * bits
    codes = (packed.unsqueeze(-1) >> shifts) & mask  # [n / per, per]
    return codes.reshape(-1).long()


def quantize(
    weight: torch.Tensor, bits: int = 4, block_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed codes uint8 [numel·bits/8], absmax float32 [numel / block_size]) of ``weight``.

    An all-zero block keeps absmax 0 and codes of the value 0 (no division by zero).
    """
    _check(weight.numel(), bits, block_size)
    blocks = weight.detach().float().reshape(-1, block_size)  # [n_blocks, block]
    absmax = blocks.abs().amax(dim=-1)  # [n_blocks]
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    normed = blocks / safe.unsqueeze(-1)  # in [-1, 1]
    codes = nearest_codes(normed, normal_float_table(bits, weight.device))
    return pack(codes.reshape(-1), bits), absmax


def dequantize(
    codes: torch.Tensor,
    absmax: torch.Tensor,
    shape: tuple[int, ...] | torch.Size,
    bits: int = 4,
    block_size: int = 64,
) -> torch.Tensor:
    """deq = T[code] · absmax per block, float32, reshaped to ``shape``."""
    table = normal_float_table(bits, codes.device)
    values = table[unpack(codes, bits)].reshape(-1, block_size)  # [n_blocks, block]
    return (values * absmax.float().unsqueeze(-1)).reshape(shape)


def quantize_dequantize(weight: torch.Tensor, bits: int = 4, block_size: int = 64) -> torch.Tensor:
    """deq(quant(weight)), float32, the shape of ``weight``."""
    codes, absmax = quantize(weight, bits, block_size)
    return dequantize(codes, absmax, weight.shape, bits, block_size)


__all__ = [
    "BITS",
    "NF_OFFSET",
    "dequantize",
    "nearest_codes",
    "normal_float_table",
    "pack",
    "quantize",
    "quantize_dequantize",
    "unpack",
]
