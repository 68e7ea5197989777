"""Batched low-rank kernels for route and mix over many LoRA-type adapters.

A method module may expose ``lowrank() -> (A [r, in], B [out, r], scale) | None`` when its
delta is exactly ``scale · B A x`` at the moment (LoRA without active dropout; VeRA and
AdaLoRA can too). Route and mix then avoid a Python loop over adapters:

* route (one adapter per row): gather one A/B pair per row from the site's bank and run two
  batched matmuls, ``Δ_i = s[slot_i] · B[slot_i] A[slot_i] x_i``;
* mix (a gate per token): one GEMM into the experts' concatenated r-dimensional hidden
  activations, scale them by each expert's gate, one GEMM back.

The bank of a site, :class:`LowRankBank`, is one tensor for every A and one for every B,
``A [n+1, r_max, in]`` and ``B [n+1, out, r_max]`` (zero-padded to the largest rank: padding
adds exact zeros; slot n is all zeros, "no adapter"; after hot swaps added adapters, a few
more zero slots are kept as room). The adapters' parameters *are* views
into it: the bank takes each parameter's values once and rebinds the parameter to its slot
(``p.data = slot``), so in-place writes (``p.data.mul_``, ``p.copy_``, ``load_state_dict``,
optimizer steps, hot swap) change the bank itself and there is nothing to invalidate.
Rebinding a parameter to another tensor (``p.data = t``, ``model.to(...)``, a deep copy)
moves it out of its slot; every call compares the parameters' data pointers with the slots
(one integer per tensor) and re-banks when one moved. A bank is only ever read while no
gradient is wanted: training forwards stack the parameters themselves, so gradients reach
them as usual.

A serving call (no gradient mode) skips even the per-child walk when it can: after a call
that found every child's factors to be its own parameters in their slots, and every child's
op *static* (``lowrank_static = True``: its ``lowrank()`` returns its own parameters and a
scale, and any assignment that could change them — the factors, the scale, dropout, the
train/eval mode — bumps :data:`EPOCH`, as LoRA does), the next call checks one integer (the
epoch) and the slots' data pointers (one C call per tensor) and reads the bank as it is.
Membership changes (hot swap) drop that shortcut; anything else takes the full path.

Parameters the bank does not own are copied into their slot at every call instead: always
current, never rebound. Those are factors computed per call (VeRA's λ-scaled projections,
AdaLoRA's A ⊙ E), parameters sharing storage with something else (FSDP's flat parameters),
and adapters of a smaller rank than the largest at the site (their B would be a strided
view, [out, r] inside [out, r_max], which save_pretrained and safetensors do not take).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

Part = tuple[torch.Tensor, torch.Tensor, float]


EPOCH = [0]  # bumped by static low-rank ops when an assignment may change what lowrank() gives


def bump_epoch() -> None:
    EPOCH[0] += 1


def lowrank_of(leaf: nn.Module) -> Part | None:
    """(A, B, scale) of a linear leaf, or None when it is not a plain low-rank delta now."""
    if getattr(leaf, "kind", None) != "linear.delta" or leaf.out_slice is not None:
        return None
    fn = getattr(leaf.op, "lowrank", None)
    return fn() if fn is not None else None


def _own(t: torch.Tensor, banks: tuple[int, ...] = ()) -> bool:
    """A plain parameter alone in its storage, or in one of the ``banks`` (storage pointers):
    rebinding it to a bank slot loses nothing."""
    if type(t) is not nn.Parameter or t.device.type == "meta":
        return False
    storage = t.untyped_storage()
    if storage.data_ptr() in banks:
        return True
    return t.storage_offset() == 0 and storage.nbytes() == t.numel() * t.element_size()


def _viewable(a: torch.Tensor, b: torch.Tensor, ref: torch.Tensor, banks: tuple[int, ...]) -> bool:
    return _own(a, banks) and _own(b, banks) and a.dtype == b.dtype == ref.dtype and a.device == b.device == ref.device


def wants_grad(parts: Sequence[Part]) -> bool:
    return torch.is_grad_enabled() and any(a.requires_grad or b.requires_grad for a, b, _ in parts)


class LowRankBank:
    """The A's and B's of one site's adapters in two tensors; the adapters' parameters are views.

    ``a`` [n+1, r_max, in], ``b`` [n+1, out, r_max], ``scale`` [n+1] (slot n: zeros)."""

    def __init__(self) -> None:
        self.a: torch.Tensor | None = None
        self.b: torch.Tensor | None = None
        self.scale: torch.Tensor | None = None
        self._slots: tuple | None = None  # per part: (A data_ptr, B data_ptr, scale), None where copied
        self._copied: tuple[int, ...] = ()  # parts copied in at every call
        self._fast: tuple | None = None  # (epoch, factor tensors, their data pointers): see fast()

    def fast(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The bank without looking at the children, when :meth:`remember` vouched for it and
        nothing changed since: the epoch is the same and every factor is still in its slot."""
        f = self._fast
        if f is None or f[0] != EPOCH[0] or tuple(map(torch.Tensor.data_ptr, f[1])) != f[2]:
            return None
        return self.a, self.b, self.scale

    def remember(self, children: Sequence[nn.Module], parts: Sequence[Part]) -> None:
        """After a full-path ``get(parts)``: let later calls use :meth:`fast` when every part
        is a static op's own parameters in its slot (nothing copied per call)."""
        if self._copied or not all(getattr(getattr(c, "op", None), "lowrank_static", False) for c in children):
            self._fast = None
            return
        tensors = tuple(t for a, b, _ in parts for t in (a, b))
        self._fast = (EPOCH[0], tensors, tuple(t.data_ptr() for t in tensors))

    def forget(self) -> None:
        self._fast = None

    def __deepcopy__(self, memo: dict) -> LowRankBank:
        return LowRankBank()  # a copy's parameters are new tensors: it banks them at its first call

    def _current(self, parts: Sequence[Part]) -> tuple:
        return tuple((a.data_ptr(), b.data_ptr(), s) for a, b, s in parts)

    def get(self, parts: Sequence[Part]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A, B, scale) of the bank holding ``parts`` as they are now (read without gradients)."""
        with torch.no_grad():
            if self._slots is None or len(self._slots) != len(parts) or not self._fits(parts):
                self.rebuild(parts)
            for i in self._copied:
                self._write(i, parts[i])
        return self.a, self.b, self.scale

    def _fits(self, parts: Sequence[Part]) -> bool:
        current = self._current(parts)
        if current == self._slots:
            return True
        if not self._copied:
            return False
        return all(want is None or want == have for want, have in zip(self._slots, current, strict=True))

    def _write(self, i: int, part: Part) -> None:
        a, b, s = part
        r = a.shape[0]
        self.a[i, :r].copy_(a)
        self.a[i, r:].zero_()
        self.b[i, :, :r].copy_(b)
        self.b[i, :, r:].zero_()
        self.scale[i] = s

    def rebuild(self, parts: Sequence[Part], spare: int = 0) -> None:
        """Allocate the bank for ``parts`` (and ``spare`` more zero slots, room for adapters
        added later), copy them in and make the owned parameters views of it."""
        banks = tuple(t.untyped_storage().data_ptr() for t in (self.a, self.b) if t is not None)
        with torch.no_grad(), torch.inference_mode(False):  # normal tensors, even under inference_mode
            ref = parts[0][0]
            r_max = max(a.shape[0] for a, _, _ in parts)
            fan_in, fan_out = ref.shape[1], parts[0][1].shape[0]
            slots = len(parts) + 1 + spare
            self.a = ref.new_zeros(slots, r_max, fan_in)
            self.b = ref.new_zeros(slots, fan_out, r_max)
            self.scale = ref.new_zeros(slots)
            slots, copied = [], []
            for i, (a, b, s) in enumerate(parts):
                self._write(i, (a, b, s))
                r = a.shape[0]
                if r == r_max and _viewable(a, b, ref, banks):
                    a.data = self.a[i, :r]
                    b.data = self.b[i, :, :r]
                    slots.append((a.data_ptr(), b.data_ptr(), s))
                else:
                    slots.append(None)
                    copied.append(i)
            self._slots, self._copied = tuple(slots), tuple(copied)

    def release(self, module: nn.Module) -> None:
        """Give ``module``'s parameters that are views of this bank their own storage again (an
        adapter leaving the site: the slot may be reused, and the bank is not kept alive by it)."""
        banks = {t.untyped_storage().data_ptr() for t in (self.a, self.b) if t is not None}
        with torch.no_grad(), torch.inference_mode(False):
            for p in module.parameters():
                if p.device.type != "meta" and p.untyped_storage().data_ptr() in banks:
                    p.data = p.data.clone()

    def adopt(self, i: int, part: Part) -> bool:
        """Put ``part`` into slot ``i`` in place (hot swap: replace slot i, or add one more
        adapter, i = n, while a zero slot stays after it); False when it does not fit."""
        if self.a is None or self._slots is None or i > len(self._slots) or i + 1 >= self.a.shape[0]:
            return False
        a, b, s = part
        banks = (self.a.untyped_storage().data_ptr(), self.b.untyped_storage().data_ptr())
        if a.shape != self.a.shape[1:] or b.shape != self.b.shape[1:] or not _viewable(a, b, self.a, banks):
            return False
        with torch.no_grad(), torch.inference_mode(False):
            self._write(i, part)
            r = a.shape[0]
            a.data = self.a[i, :r]
            b.data = self.b[i, :, :r]
        slots = list(self._slots) + [None] * (i + 1 - len(self._slots))
        slots[i] = (a.data_ptr(), b.data_ptr(), s)
        self._slots = tuple(slots)
        self._copied = tuple(j for j in self._copied if j != i)
        return True


def release_freed_memory(modules) -> None:
    """Give the C heap's free pages back to the OS (glibc ``malloc_trim``) once ``modules``
    hold banks: building them freed the adapters' first, per-tensor storage, small blocks the
    allocator would otherwise keep resident. A no-op elsewhere."""
    if not any(isinstance(getattr(m, "bank", None), LowRankBank) and m.bank.a is not None for m in modules):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def stack_lowrank(parts: Sequence[Part]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A [n+1, r_max, in], B [n+1, out, r_max] and scales [n+1], zero-padded, with a zero last
    slot: differentiable in the parts (the training path)."""
    r_max = max(a.shape[0] for a, _, _ in parts)
    fan_in, fan_out = parts[0][0].shape[1], parts[0][1].shape[0]
    ref = parts[0][0]
    rows_a, rows_b = [], []
    for a, b, _ in parts:
        pad = r_max - a.shape[0]
        rows_a.append(a if pad == 0 else torch.cat([a, a.new_zeros(pad, fan_in)], 0))
        rows_b.append(b if pad == 0 else torch.cat([b, b.new_zeros(fan_out, pad)], 1))
    rows_a.append(ref.new_zeros(r_max, fan_in))
    rows_b.append(ref.new_zeros(fan_out, r_max))
    scale = torch.tensor([s for _, _, s in parts] + [0.0], dtype=ref.dtype, device=ref.device)
    return torch.stack(rows_a), torch.stack(rows_b), scale


def bank_of(bank: LowRankBank, parts: Sequence[Part]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The bank (serving: no copy) or, when gradients are wanted, the parts stacked."""
    return stack_lowrank(parts) if wants_grad(parts) else bank.get(parts)


def routed_delta(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, slot: torch.Tensor,
    into: torch.Tensor | None = None,
) -> torch.Tensor:
    """Row i gets s[slot[i]] B[slot[i]] A[slot[i]] x_i (slot = n for rows without an adapter).

    With ``into`` (the base output, [..., out], not needing gradients) the delta is added to
    it in place and ``into`` is returned: one GEMM pass less, no delta tensor."""
    flat = x.reshape(x.shape[0], -1, x.shape[-1])  # [B, T, in]
    a_rows = a.index_select(0, slot)  # [B, r, in]
    if flat.shape[1] > 1:  # A x as [B, r, T]: MKL runs this product about twice as fast as x Aᵀ
        h = torch.bmm(a_rows, flat.transpose(1, 2)).transpose(1, 2)  # [B, T, r]
    else:
        h = torch.bmm(flat, a_rows.transpose(1, 2))  # [B, 1, r]
    h = h * scale.index_select(0, slot)[:, None, None]
    b_rows = b.index_select(0, slot).transpose(1, 2)  # [B, r, out]
    if into is not None:
        into.view(flat.shape[0], flat.shape[1], -1).baddbmm_(h, b_rows)
        return into
    y = torch.bmm(h, b_rows)  # [B, T, out]
    return y.reshape(*x.shape[:-1], y.shape[-1])


def mixed_delta(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, gates: torch.Tensor,
    into: torch.Tensor | None = None,
) -> torch.Tensor:
    """Σₑ gₑ(x) sₑ Bₑ Aₑ x with two GEMMs over E experts of a bank (A [≥E, r, in], B [≥E, out, r]);
    gates [..., E] broadcast against x's leading dims. ``into`` as for :func:`routed_delta`."""
    n, r = gates.shape[-1], a.shape[1]
    h = x @ a[:n].reshape(n * r, a.shape[2]).t()  # [..., E·r]
    g = (gates * scale[:n]).unsqueeze(-1)  # [..., E, 1]
    h = (h.unflatten(-1, (n, r)) * g).flatten(-2)  # [..., E·r]
    b_cat = b[:n].permute(0, 2, 1).reshape(n * r, b.shape[1])  # [E·r, out]
    if into is not None:
        into.view(-1, into.shape[-1]).addmm_(h.reshape(-1, n * r), b_cat)
        return into
    return h @ b_cat


def in_place_target(call, node: nn.Module, dtype: torch.dtype, grad: bool) -> torch.Tensor | None:
    """The base output of a linear call that ``node`` may add its delta (of ``dtype``; ``grad``:
    it needs gradients) to in place: ``node`` is the site's whole program, neither needs
    gradients and the output is contiguous."""
    site, y = getattr(call, "site", None), getattr(call, "y", None)
    if y is None or site is None or getattr(site, "program", None) is not node or y.requires_grad:
        return None
    if grad or not y.is_contiguous() or y.dtype != dtype:
        return None
    return y
