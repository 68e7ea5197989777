"""GaLore (Zhao et al. 2024): full-rank training with optimizer state in a low-rank gradient subspace.

At every targeted linear site the adapter is a dense update ΔW [out, in], zero at start:

    y = W x + ΔW x                       (W frozen; merging is exact: W' = W + ΔW)

The memory saving lives in the optimizer, :class:`GaLoreAdamW`. For a parameter flagged
``galore=True`` with gradient G [m, n] at step t (counted from 0, as in the paper's
Algorithm 2) and rank r:

    if t mod T = 0:  U S Vᵀ = SVD(G);  P = U[:, :r]  (left)   or  Q = V[:, :r]  (right)
    R  = Pᵀ G  [r, n]                                 or  R = G Q  [m, r]
    M ← β₁ M + (1 − β₁) R,      V ← β₂ V + (1 − β₂) R ⊙ R
    N  = M̂ / (√V̂ + ε),          M̂ = M / (1 − β₁ᵗ⁺¹),  V̂ = V / (1 − β₂ᵗ⁺¹)
    W ← W − η λ W − η α P N                          or  W ← W − η λ W − η α N Qᵀ

``proj_type="std"`` projects on the shorter side (left when m ≤ n, right otherwise), so
the moments take 2·r·max(m, n) floats and the projector r·min(m, n), against AdamW's
2·m·n. The official implementation breaks the m = n tie the other way (right); the state
size is the same. The moments are kept, not rotated, when the projector is recomputed,
as in the paper and the official code. A rank above min(m, n) is clamped to it.
Unflagged parameters, and flagged ones that are not matrices, get plain AdamW.

:class:`GaLoreAdamW` is an ordinary ``torch.optim.Optimizer``: it trains composed
adapters (``GaLoreAdamW(composed.param_groups(lr))``) and whole models alike
(``GaLoreAdamW(galore_param_groups(model, lr=..., rank=...))``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from adapter_composer.registry import Capabilities, hookimpl

__all__ = [
    "GaLoreAdamW",
    "GaLoreConfig",
    "GaLoreDelta",
    "build",
    "galore_param_groups",
    "param_groups",
    "projection_side",
    "top_singular_vectors",
]

ProjType = Literal["std", "left", "right"]
PROJ_TYPES = ("std", "left", "right")


class GaLoreConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    rank: int = Field(
        128, ge=1, description="rank r of the gradient subspace (clamped to min(out, in))"
    )
    update_proj_gap: int = Field(
        200, ge=1, description="T: the projector is recomputed from the gradient every T steps"
    )
    scale: float = Field(
        0.25, gt=0, description="alpha: the projected-back update is multiplied by it"
    )
    proj_type: ProjType = Field(
        "std",
        description="which singular vectors project the gradient: 'std' the shorter side "
        "(left when out <= in), 'left' always U[:, :r], 'right' always V[:, :r]",
    )


# --- the adapter module ---------------------------------------------------------------


class GaLoreDelta(nn.Module):
    """Δ(x) = ΔW x with a dense ΔW [out, in], zero at initialisation."""

    def __init__(self, fan_in: int, fan_out: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.delta = nn.Parameter(torch.zeros(fan_out, fan_in, dtype=dtype))

    def forward(self, x: torch.Tensor, site: Any) -> torch.Tensor:
        return F.linear(x, self.delta)  # [..., in] → [..., out]

    def delta_weight(self, site: Any) -> torch.Tensor:
        return self.delta

    def extra_repr(self) -> str:
        out, fan_in = self.delta.shape
        return f"dense ΔW [{out}, {fan_in}]"


def build(config: GaLoreConfig, site: Any) -> nn.Module:
    return GaLoreDelta(site.in_features, site.out_features)


def _group_options(config: GaLoreConfig) -> dict[str, Any]:
    return {
        "galore": True,
        "rank": config.rank,
        "update_proj_gap": config.update_proj_gap,
        "scale": config.scale,
        "proj_type": config.proj_type,
    }


def param_groups(
    config: GaLoreConfig, modules: Mapping[str, nn.Module], lr: float
) -> list[dict[str, Any]]:
    """One group holding every ΔW of the adapter, flagged for projection by :class:`GaLoreAdamW`
    (other optimizers ignore the extra keys and train ΔW densely)."""
    return [{"params": [m.delta for m in modules.values()], "lr": lr, **_group_options(config)}]


def galore_param_groups(
    model: nn.Module,
    *,
    lr: float,
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    proj_type: ProjType = "std",
    weight_decay: float = 0.0,
    include: str | Callable[[str, nn.Module], bool] | None = None,
) -> list[dict[str, Any]]:
    """Groups for full-parameter GaLore training of a plain model (no composition).

    Flags the weight of every ``nn.Linear`` chosen by ``include`` (a regex matched against
    the module path, or a predicate ``(name, module) -> bool``); by default every linear
    layer except the output head, as in the paper. Every other trainable parameter
    (embeddings, norms, biases) goes in a plain AdamW group."""
    if include is None:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None

        def chosen(name: str, module: nn.Module) -> bool:
            return module is not head
    elif isinstance(include, str):
        pattern = re.compile(include)

        def chosen(name: str, module: nn.Module) -> bool:
            return pattern.search(name) is not None
    else:
        chosen = include
    flagged = {
        id(m.weight): m.weight
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and m.weight.requires_grad and chosen(name, m)
    }
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in flagged]
    options = _group_options(
        GaLoreConfig(rank=rank, update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type)
    )
    groups = [{"params": list(flagged.values()), "lr": lr, "weight_decay": weight_decay, **options}]
    if rest:
        groups.append({"params": rest, "lr": lr, "weight_decay": weight_decay})
    return [g for g in groups if g["params"]]


# --- the optimizer --------------------------------------------------------------------


def projection_side(proj_type: str, m: int, n: int) -> Literal["left", "right"]:
    """'left' (R = Pᵀ G [r, n]) or 'right' (R = G Q [m, r]) for a gradient of shape [m, n]."""
    if proj_type == "std":
        return "left" if m <= n else "right"
    return proj_type  # type: ignore[return-value]


def top_singular_vectors(grad: torch.Tensor, rank: int, side: str) -> torch.Tensor:
    """The projector from G = U S Vᵀ: U[:, :r] [m, r] (left) or V[:, :r] [n, r] (right).

    The SVD runs in float32 (float64 stays float64); the projector has the gradient's dtype."""
    g = grad if grad.dtype in (torch.float32, torch.float64) else grad.float()
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    basis = u[:, :rank] if side == "left" else vh[:rank].mT
    return basis.to(grad.dtype).contiguous()


def _check_options(options: Mapping[str, Any]) -> None:
    problems = []
    if not options["lr"] >= 0:
        problems.append(f"lr must be >= 0, got {options['lr']}")
    if not options["eps"] >= 0:
        problems.append(f"eps must be >= 0, got {options['eps']}")
    if not all(0.0 <= b < 1.0 for b in options["betas"]):
        problems.append(f"betas must lie in [0, 1), got {options['betas']}")
    if not options["weight_decay"] >= 0:
        problems.append(f"weight_decay must be >= 0, got {options['weight_decay']}")
    if not (isinstance(options["rank"], int) and options["rank"] >= 1):
        problems.append(f"rank must be an integer >= 1, got {options['rank']!r}")
    if not (isinstance(options["update_proj_gap"], int) and options["update_proj_gap"] >= 1):
        problems.append(
            f"update_proj_gap must be an integer >= 1, got {options['update_proj_gap']!r}"
        )
    if not options["scale"] > 0:
        problems.append(f"scale must be > 0, got {options['scale']}")
    if options["proj_type"] not in PROJ_TYPES:
        problems.append(f"proj_type must be one of {PROJ_TYPES}, got {options['proj_type']!r}")
    if problems:
        raise ValueError("GaLoreAdamW: " + "; ".join(problems))


class GaLoreAdamW(torch.optim.Optimizer):
    """AdamW whose moments live in a rank-r gradient subspace for groups with ``galore=True``.

    The update rules are in the module docstring. Group keys (defaults from the
    constructor): ``lr betas eps weight_decay`` as in ``torch.optim.AdamW`` (decoupled
    decay, W ← W(1 − ηλ) − η·update, applied to the full weight), and ``galore rank
    update_proj_gap scale proj_type`` for the projection; ``galore`` is off unless a group
    (or the constructor) turns it on, so embeddings and norms stay plain by default. Per-parameter state: ``step``
    (int), ``exp_avg`` and ``exp_avg_sq`` ([r, n] or [m, r] when projected), ``projector``
    (P [m, r] or Q [n, r]).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        galore: bool = False,
        rank: int = 128,
        update_proj_gap: int = 200,
        scale: float = 0.25,
        proj_type: ProjType = "std",
    ):
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            galore=galore,
            rank=rank,
            update_proj_gap=update_proj_gap,
            scale=scale,
            proj_type=proj_type,
        )
        _check_options(defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        _check_options(self.param_groups[-1])

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("GaLoreAdamW does not support sparse gradients")
                if group["galore"] and p.ndim == 2:
                    self._galore_step(p, group)
                else:
                    self._adamw_step(p, group)
        return loss

    def _moments_direction(
        self, state: dict[str, Any], r: torch.Tensor, group: Mapping[str, Any]
    ) -> torch.Tensor:
        """Advance the moments with R and return N = M̂ / (√V̂ + ε) (step t counted from 1)."""
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(r, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(r, memory_format=torch.preserve_format)
        state["step"] = t = state.get("step", 0) + 1
        beta1, beta2 = group["betas"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.lerp_(r, 1 - beta1)
        v.mul_(beta2).addcmul_(r, r, value=1 - beta2)
        m_hat = m / (1 - beta1**t)
        v_hat = v / (1 - beta2**t)
        return m_hat / v_hat.sqrt().add_(group["eps"])

    def _adamw_step(self, p: torch.Tensor, group: Mapping[str, Any]) -> None:
        """W ← W(1 − ηλ) − η M̂ / (√V̂ + ε)."""
        n = self._moments_direction(self.state[p], p.grad, group)
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(n, alpha=-group["lr"])

    def _galore_step(self, p: torch.Tensor, group: Mapping[str, Any]) -> None:
        """R = Pᵀ G (or G Q), Adam on R, W ← W(1 − ηλ) − η α P N (or N Qᵀ)."""
        state, g = self.state[p], p.grad
        side = projection_side(group["proj_type"], *g.shape)
        if state.get("step", 0) % group["update_proj_gap"] == 0 or "projector" not in state:
            state["projector"] = top_singular_vectors(g, group["rank"], side)
        proj = state["projector"]  # P [m, r] or Q [n, r]
        r = proj.mT @ g if side == "left" else g @ proj  # [r, n] or [m, r]
        n = self._moments_direction(state, r, group)
        update = proj @ n if side == "left" else n @ proj.mT  # [m, n]
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(update.to(p.dtype), alpha=-group["lr"] * group["scale"])


@hookimpl
def register_methods(register):
    register.method(
        "galore",
        config=GaLoreConfig,
        build=build,
        points=["linear.delta"],
        capabilities=Capabilities(mergeable=True, identity_at_init=True),
        default_targets=["attn.q", "attn.k", "attn.v", "attn.o", "mlp.up", "mlp.down"],
        param_groups=param_groups,
        description="GaLore: a dense update W + ΔW trained full-rank by GaLoreAdamW, whose "
        "Adam state lives in a rank-r projection of the gradient (refreshed every T steps).",
    )
