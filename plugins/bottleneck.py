"""Bottleneck adapters: Houlsby et al. 2019, Pfeiffer et al. 2021, He et al. 2022 (parallel).

One small MLP per sublayer, added to the sublayer's result before the residual add:

    f(u) = s · (W_up dropout(act(W_down u + b_down)) + b_up)      W_down: [m, d], W_up: [d, m]

    houlsby   after attention and after the FFN   h ↦ h + f(h)   (kind sublayer.output)
    pfeiffer  after the FFN only                  h ↦ h + f(h)   (kind sublayer.output)
    parallel  beside the sublayer (FFN)           h ↦ h + f(x)   (kind sublayer.parallel)

h is the sublayer's result, x its input (the site adds the residual; ``forward`` returns f
only). The bottleneck width is ``m = bottleneck`` or ``m = d // reduction_factor``, d the
model width. W_up and b_up start at zero, so a fresh adapter is the identity. f is
non-linear in its input, so it cannot be folded into any base weight: the method is not
mergeable (the host refuses ``merge()`` with ``merge-not-exact``). Dropout acts on the
bottleneck activations (as in He et al.'s code); BERT's own dropout follows the site.

Targets. ``style`` is a preset for placement and scaling, but the host's default targets
cannot depend on a config, so the method registers ``default_targets=["mlp"]`` (what the
default style, pfeiffer, and the parallel style use). ``style="houlsby"`` therefore needs
``targets=["attn", "mlp"]``; leaving targets unset is refused with ``houlsby-needs-targets``
rather than silently acting on the FFN only. Explicit ``targets=`` always win (e.g.
``style="parallel", targets=["attn", "mlp"]`` puts a parallel adapter beside both).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from adapter_composer.registry import Capabilities, Diagnostic, hookimpl

__all__ = ["BottleneckAdapter", "BottleneckConfig", "build", "point_for"]

METHOD = "bottleneck"
HOULSBY_TARGETS = ("attn", "mlp")
DEFAULT_TARGETS = ("mlp",)
INIT_STD = 1e-2  # Houlsby et al.: near-identity init, N(0, 10⁻²) truncated at two std

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "swish": nn.SiLU,
    "tanh": nn.Tanh,
}


class BottleneckConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    style: Literal["houlsby", "pfeiffer", "parallel"] = Field(
        "pfeiffer",
        description="preset: houlsby (after attention and FFN), pfeiffer (after the FFN), "
        "parallel (beside the sublayer, on its input; He et al. 2022)",
    )
    bottleneck: int | None = Field(
        None, ge=1, description="bottleneck width m (give this or reduction_factor)"
    )
    reduction_factor: float | None = Field(
        None, gt=0, description="m = d // reduction_factor, d the model width (or give bottleneck)"
    )
    non_linearity: Literal["relu", "gelu", "swish", "tanh"] = Field(
        "relu", description="activation between the down- and the up-projection"
    )
    scaling: float | None = Field(
        None,
        allow_inf_nan=False,
        description="s multiplying the adapter's output; None: 1.0 (houlsby, pfeiffer) or "
        "4.0 (parallel, as in He et al. 2022)",
    )
    dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="dropout on the bottleneck activations (training only)"
    )
    init: Literal["normal", "kaiming"] = Field(
        "normal",
        description="initialisation of W_down: normal (Houlsby: N(0, 1e-2²) truncated at 2 std) "
        "or kaiming (uniform, as LoRA / He et al.); W_up, b_up and b_down start at zero",
    )

    @model_validator(mode="after")
    def _one_size(self) -> BottleneckConfig:
        if (self.bottleneck is None) == (self.reduction_factor is None):
            given = "both" if self.bottleneck is not None else "neither"
            raise ValueError(
                f"give exactly one of bottleneck (m) and reduction_factor (m = d // "
                f"reduction_factor); got {given}"
            )
        return self

    @property
    def scale(self) -> float:
        """s: the configured scaling, else 4.0 for parallel adapters and 1.0 otherwise."""
        if self.scaling is not None:
            return self.scaling
        return 4.0 if self.style == "parallel" else 1.0

    def size(self, width: int) -> int:
        """m for a sublayer of width d: ``bottleneck`` or ``d // reduction_factor``."""
        if self.bottleneck is not None:
            return self.bottleneck
        return int(width // self.reduction_factor)


class BottleneckAdapter(nn.Module):
    """f(u) = s · (W_up dropout(act(W_down u + b_down)) + b_up); the site adds it to h."""

    def __init__(
        self,
        width: int,
        size: int,
        non_linearity: str,
        scale: float,
        dropout: float = 0.0,
        init: str = "normal",
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        if not 1 <= size <= width:
            raise ValueError(f"bottleneck size {size} must be between 1 and the width {width}")
        self.down = nn.Linear(width, size, dtype=dtype)  # W_down [m, d], b_down [m]
        self.up = nn.Linear(size, width, dtype=dtype)  # W_up [d, m], b_up [d]
        self.act = ACTIVATIONS[non_linearity]()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scale = scale
        with torch.no_grad():
            if init == "normal":
                nn.init.trunc_normal_(
                    self.down.weight, std=INIT_STD, a=-2 * INIT_STD, b=2 * INIT_STD
                )
            else:
                nn.init.kaiming_uniform_(self.down.weight, a=5**0.5)
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        z = self.dropout(self.act(F.linear(u, self.down.weight, self.down.bias)))  # [..., m]
        return self.scale * F.linear(z, self.up.weight, self.up.bias)  # [..., d]

    def extra_repr(self) -> str:
        return f"m={self.down.out_features}, act={type(self.act).__name__}, scale={self.scale:g}"


def point_for(config: BottleneckConfig, site: Any) -> str:
    """The kind at every site: the parallel style reads the sublayer's input."""
    return "sublayer.parallel" if config.style == "parallel" else "sublayer.output"


def build(config: BottleneckConfig, site: Any) -> nn.Module:
    width = site.in_features
    return BottleneckAdapter(
        width, config.size(width), config.non_linearity, config.scale, config.dropout, config.init
    )


# --- validation -------------------------------------------------------------------------


def _size_problems(name: str, config: BottleneckConfig, sites: list[Any]) -> list[Diagnostic]:
    wide = [s for s in sites if config.size(s.in_features) > s.in_features]
    empty = [s for s in sites if config.size(s.in_features) < 1]
    how = (
        f"bottleneck={config.bottleneck}"
        if config.bottleneck is not None
        else f"reduction_factor={config.reduction_factor:g} (m = d // reduction_factor)"
    )
    out = []
    if wide:
        widths = sorted({s.in_features for s in wide})
        m = config.size(widths[0])
        out.append(
            Diagnostic(
                code="bottleneck-too-wide",
                message=f"adapter {name!r} ({METHOD}) has a bottleneck of {m} (from {how}), wider "
                f"than the model width {', '.join(map(str, widths))} at {len(wide)} site(s)",
                nodes=(name,),
                sites=tuple(s.key for s in wide),
                rule="a bottleneck adapter projects the width d down to m ≤ d",
                fix=f"choose bottleneck ≤ {widths[0]} (e.g. {max(widths[0] // 16, 1)}) or "
                "reduction_factor ≥ 1 (e.g. 16)",
                plugin=f"adapter_composer.plugins.{METHOD}",
            )
        )
    if empty:
        widths = sorted({s.in_features for s in empty})
        out.append(
            Diagnostic(
                code="bottleneck-empty",
                message=f"adapter {name!r} ({METHOD}): {how} leaves a bottleneck of 0 units at "
                f"width {', '.join(map(str, widths))}",
                nodes=(name,),
                sites=tuple(s.key for s in empty),
                rule="m = d // reduction_factor must be at least 1",
                fix=f"choose reduction_factor ≤ {widths[0]} or give bottleneck=m directly",
                plugin=f"adapter_composer.plugins.{METHOD}",
            )
        )
    return out


def _houlsby_targets(name: str, spec: Any) -> list[Diagnostic]:
    if spec.targets is not None:
        return []
    return [
        Diagnostic(
            code="houlsby-needs-targets",
            message=f"adapter {name!r} has style 'houlsby' (adapters after attention and after "
            f"the FFN) but no targets; the method's default targets {list(DEFAULT_TARGETS)} are "
            "those of the pfeiffer and parallel styles, and would leave attention without one",
            nodes=(name,),
            rule="default targets cannot depend on the config; houlsby's placement is explicit",
            fix=f"pass targets={list(HOULSBY_TARGETS)} (or style='pfeiffer' for the FFN only)",
            plugin=f"adapter_composer.plugins.{METHOD}",
        )
    ]


# --- hooks ------------------------------------------------------------------------------


@hookimpl
def check_graph(graph, registry):
    found: list[Diagnostic] = []
    for name, spec in graph.specs.items():
        if graph.method_of(name) != METHOD:
            continue
        config = graph.config(name)
        if not isinstance(config, BottleneckConfig):  # bad-config was already reported
            continue
        if config.style == "houlsby":
            found += _houlsby_targets(name, spec)
        found += _size_problems(name, config, graph.sites(name))
    return found


@hookimpl
def register_methods(register):
    register.method(
        METHOD,
        config=BottleneckConfig,
        build=build,
        points=["sublayer.output", "sublayer.parallel"],
        point_for=point_for,
        capabilities=Capabilities(mergeable=False, identity_at_init=True),
        default_targets=DEFAULT_TARGETS,
        description="Bottleneck adapter h + s·(W_up act(W_down u + b_down) + b_up): Houlsby, "
        "Pfeiffer (u = h) and parallel (u = the sublayer input x) styles.",
    )
