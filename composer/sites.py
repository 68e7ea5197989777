"""Sites: where an adapter acts (``SiteInfo``) and the linear-layer helpers sites use.

Target resolution (roles, module names, regexes → sites) is in :mod:`adapter_composer.pipeline.resolve`.

Quantised bases (bitsandbytes' ``Linear4bit`` and ``Linear8bitLt``) are linear layers whose
``weight`` holds codes, not values. :func:`linear_weight` returns their dequantised weight
W_deq [out, in], the matrix the layer multiplies by:

    4-bit (NF4/FP4)   W_deq = T[code] · absmax_block      (bitsandbytes' dequantize_4bit)
    8-bit (LLM.int8)  W_deq = code · SCB_row / 127       (bitsandbytes' int8_vectorwise_dequant)

bitsandbytes is imported only when such a layer is met, so it stays an optional dependency.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from adapter_composer.errors import ComposerError
from adapter_composer.registry import (
    AttentionGeometry,
)

MODEL_FAMILIES = ("prefix", "prompt", "optimizer")


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, or a transformers ``Conv1D`` (GPT-2's transposed linear)."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear-like module."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    w = module.weight
    return int(w.shape[0]), int(w.shape[1])


def quantization(module: nn.Module) -> str | None:
    """``"bnb-4bit"`` / ``"bnb-8bit"`` for a bitsandbytes layer holding quantised weights, else None."""
    w = getattr(module, "weight", None)
    name = type(w).__name__
    if name == "Params4bit" and _quant_state(module) is not None:
        return "bnb-4bit"
    if name == "Int8Params" and w.dtype == torch.int8:
        return "bnb-8bit"
    return None


def _quant_state(module: nn.Module) -> Any:
    # bitsandbytes keeps the state on the parameter; wrappers that rebuild parameters
    # (FSDP) lose it there, and the module keeps a copy
    return getattr(module.weight, "quant_state", None) or getattr(module, "quant_state", None)


def logical_shape(param: torch.Tensor) -> tuple[int, ...]:
    """The shape a parameter stands for: a packed 4-bit weight [n·k/2, 1] stands for [n, k]."""
    state = getattr(param, "quant_state", None) if type(param).__name__ == "Params4bit" else None
    return tuple(state.shape) if state is not None else tuple(param.shape)


def _dequantize_4bit(module: nn.Module) -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    state = _quant_state(module)
    data = module.weight.data
    if not getattr(state, "packing_format_for_cpu", False):
        return bnbf.dequantize_4bit(data, state)
    # bitsandbytes' CPU inference path (AVX512-BF16) repacks the codes for its own kernel and
    # keeps absmax as bfloat16 [in / block, out]; undo the nibble order on a copy of the state
    # and take absmax from the repacked layout (the library's inverse leaves it transposed)
    inverse = getattr(bnbf, "_convert_weight_packed_for_cpu_inverse", None)
    if inverse is None:
        raise ComposerError(
            "this bitsandbytes version repacked a 4-bit weight for its CPU kernel but offers no "
            "inverse to read it back; install bitsandbytes 0.49 or 0.50"
        )
    codes, _ = inverse(data, copy.copy(state))
    plain = bnbf.QuantState(
        absmax=state.absmax.t().reshape(-1).float(),
        shape=state.shape,
        code=state.code,
        blocksize=state.blocksize,
        quant_type=state.quant_type,
        dtype=state.original_dtype,
    )
    return bnbf.dequantize_4bit(codes, plain)


def _dequantize_8bit(module: nn.Module) -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    scb = getattr(module.weight, "SCB", None)
    if scb is None:
        scb = getattr(getattr(module, "state", None), "SCB", None)
    if scb is None:
        raise ComposerError(
            f"the 8-bit weight of this {type(module).__name__} has no scale (SCB): it was never "
            "quantised; move the model to its device (bitsandbytes quantises on .to())"
        )
    return bnbf.int8_vectorwise_dequant(module.weight.data, scb.to(module.weight.device))


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight as [out, in]: a view for nn.Linear (Conv1D stores [in, out], so its transpose),
    a fresh dequantised tensor for a bitsandbytes 4-bit or 8-bit layer."""
    kind = quantization(module)
    if kind == "bnb-4bit":
        return _dequantize_4bit(module)
    if kind == "bnb-8bit":
        return _dequantize_8bit(module)
    return module.weight if isinstance(module, nn.Linear) else module.weight.t()


@dataclass(frozen=True, eq=False)
class SiteInfo:
    """Where one adapter acts, as given to a method's ``build(config, site)``.

    ``key`` is architecture-neutral (``layers.3.attn.q``) and names the adapter's weights
    on disk; ``path`` is the module path in this model; ``out_slice`` is the part of a
    fused output the role owns (GPT-2's ``c_attn``); ``in_features``/``out_features``
    are the sizes the method sees (the slice's size, not the fused one).
    """

    key: str
    path: str
    family: str
    kind: str
    role: str | None = None
    layer: int | None = None
    out_slice: tuple[int, int] | None = None
    in_features: int = 0
    out_features: int = 0
    input_path: str | None = None
    geometry: AttentionGeometry | None = None
    model_config: Any = field(default=None, repr=False)
    module: nn.Module | None = field(default=None, repr=False)
    dtype: torch.dtype = torch.float32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def weight(self) -> torch.Tensor:
        """The base weight this site sees, [out_features, in_features]: sliced, never copied,
        except a quantised base's, which is dequantised (see :func:`linear_weight`)."""
        if self.module is None or not is_linear(self.module):
            raise TypeError(f"site {self.key} has no linear weight")
        w = linear_weight(self.module)
        if self.out_slice is not None:
            w = w[self.out_slice[0] : self.out_slice[1]]
        return w

    def bias(self) -> torch.Tensor | None:
        b = getattr(self.module, "bias", None)
        if b is not None and self.out_slice is not None:
            b = b[self.out_slice[0] : self.out_slice[1]]
        return b
