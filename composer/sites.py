"""Sites: where an adapter acts (``SiteInfo``) and the linear-layer helpers sites use.

Target resolution (roles, module names, regexes → sites) is in :mod:`adapter_composer.pipeline.resolve`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

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


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight as [out, in] (a view; Conv1D stores [in, out])."""
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
        """The base weight this site sees, [out_features, in_features] (sliced, never copied)."""
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
