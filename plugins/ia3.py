"""(IA)³ (Liu et al. 2022): learned vectors that rescale activations.

    keys, values   y = (W x + b) ⊙ l        l ∈ ℝ^out    (linear.scale_out; the bias is scaled too)
    feed-forward   y = W (x ⊙ l) + b        l ∈ ℝ^in     (linear.scale_in, the down projection's input)

Every l starts at 1, so a fresh adapter is the identity. Both forms fold exactly into the
weights (W' = diag(l) W, b' = l ⊙ b; or W' = W diag(l)); the host's fold algebra does it from
:meth:`IA3.scale`. A site is feed-forward when one of ``feedforward`` names it: a role
(``mlp.down``), a regex matched against the end of the module path at a ``.`` boundary (as
LoRA's ``rank_pattern`` keys), or ``re:<regex>`` matched against the whole path.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from adapter_composer.formats.peft import PREFIX, peft_bool, peft_strings, unsupported_options
from adapter_composer.patterns import compile_pattern, fullmatch
from adapter_composer.plugins.lora import pattern_value
from adapter_composer.registry import Capabilities, hookimpl

SCALE_OUT, SCALE_IN = "linear.scale_out", "linear.scale_in"
# our tensor name per kind; the name records the side, so a file that disagrees with the
# config about which layers are feed-forward fails to load instead of scaling the wrong side
TENSOR = {SCALE_OUT: "l_out", SCALE_IN: "l_in"}


class IA3Config(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    feedforward: tuple[str, ...] = Field(
        ("mlp.down",),
        description="sites whose input (not output) is scaled: roles, end-of-path regexes, "
        "or 're:<regex>' matched against the whole module path",
    )
    init: Literal["ones", "normal"] = Field(
        "ones",
        description="initial vectors: ones (the identity, as in the paper) or standard normal "
        "(PEFT's init_ia3_weights=False)",
    )

    @field_validator("feedforward")
    @classmethod
    def _patterns_compile(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for p in v:
            compile_pattern(p[3:] if p.startswith("re:") else p, what="feedforward pattern")
        return v


def is_feedforward(config: IA3Config, site: Any) -> bool:
    """Whether one of ``config.feedforward`` names this site (see the module docstring)."""
    for p in config.feedforward:
        if p.startswith("re:"):
            if fullmatch(p[3:], site.path, what="feedforward pattern"):
                return True
        elif pattern_value({p: True}, site, False):
            return True
    return False


def point_for(config: IA3Config, site: Any) -> str:
    return SCALE_IN if is_feedforward(config, site) else SCALE_OUT


class IA3(nn.Module):
    """The learned vector l of one site: scale() = l, [out] for scale_out, [in] for scale_in."""

    def __init__(self, size: int, kind: str, init: str = "ones", dtype=torch.float32):
        super().__init__()
        self.kind = kind
        self.name = TENSOR[kind]
        value = torch.ones(size, dtype=dtype) if init == "ones" else torch.randn(size, dtype=dtype)
        self.register_parameter(self.name, nn.Parameter(value))

    def scale(self) -> torch.Tensor:
        return getattr(self, self.name)

    def extra_repr(self) -> str:
        return f"{self.name}: [{self.scale().shape[0]}]"


def build(config: IA3Config, site: Any) -> nn.Module:
    size = site.in_features if site.kind == SCALE_IN else site.out_features
    return IA3(size, site.kind, config.init)


# --- PEFT format ----------------------------------------------------------------------


class IA3PeftCodec:
    """Reads and writes PEFT's ``IA3Config`` files.

    PEFT saves ``<path>.ia3_l`` as [out, 1] on ordinary targets and [1, in] on
    ``feedforward_modules``; we keep a flat vector named after its side (``l_out``/``l_in``).
    PEFT matches ``feedforward_modules`` as a full regex (a string) or by ``str.endswith``
    (a list); both become ``re:`` patterns here, so the same layers are feed-forward.
    """

    peft_types = ("IA3",)
    unsupported = {"modules_to_save": None}

    def from_peft(self, peft: Mapping[str, Any]) -> dict[str, Any]:
        problems = unsupported_options(peft, self.unsupported, bias=False)
        if problems:
            raise ValueError("unsupported PEFT IA3 options: " + ", ".join(problems))
        ff = peft_strings(peft, "feedforward_modules", None)
        if ff is None:
            raise ValueError(
                "feedforward_modules is missing; PEFT fills it in when it creates an adapter, "
                "so add it to adapter_config.json (an empty list when no layer is feed-forward)"
            )
        if isinstance(ff, str):
            patterns = [f"re:{ff}"]
        else:
            patterns = [f"re:.*{re.escape(name)}" for name in sorted(ff)]
        for pattern in patterns:
            compile_pattern(pattern[3:], what="feedforward_modules")
        init = "ones" if peft_bool(peft, "init_ia3_weights", True) else "normal"
        return {"feedforward": patterns, "init": init}

    def to_peft(self, config: IA3Config, sites: list[Any]) -> dict[str, Any]:
        return {
            "peft_type": "IA3",
            "task_type": None,
            "target_modules": sorted(s.path for s in sites),
            "feedforward_modules": sorted(s.path for s in sites if s.kind == SCALE_IN),
            "fan_in_fan_out": any(type(s.module).__name__ == "Conv1D" for s in sites),
            "init_ia3_weights": config.init == "ones",
            "inference_mode": True,
            "modules_to_save": None,
            "exclude_modules": None,
        }

    def split_tensors(self, raw: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        """``base_model.model.<path>.ia3_l`` → ``{path: {"l_out" | "l_in": flat vector}}``."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        suffix = ".ia3_l"
        for key, value in raw.items():
            if not (key.startswith(PREFIX) and key.endswith(suffix)):
                raise ValueError(f"tensor {key!r} is not an IA3 vector ({PREFIX}<module>{suffix})")
            if value.dim() != 2 or 1 not in value.shape:
                raise ValueError(
                    f"tensor {key!r} has shape {tuple(value.shape)}; IA3 vectors are [out, 1] or [1, in]"
                )
            kind = SCALE_IN if value.shape[0] == 1 and value.shape[1] != 1 else SCALE_OUT
            out.setdefault(key[len(PREFIX) : -len(suffix)], {})[TENSOR[kind]] = value.flatten()
        return out

    def join_tensors(self, handle: Any, sites: list[Any]) -> dict[str, torch.Tensor]:
        """The inverse of :meth:`split_tensors`: [out, 1] or [1, in] by the site's kind."""
        tensors = {}
        for info in sites:
            vector = handle.modules[info.key].scale().detach()
            shaped = vector[None, :] if info.kind == SCALE_IN else vector[:, None]
            tensors[f"{PREFIX}{info.path}.ia3_l"] = shaped
        return tensors


@hookimpl
def register_methods(register):
    register.method(
        "ia3",
        config=IA3Config,
        build=build,
        points=[SCALE_OUT, SCALE_IN],
        point_for=point_for,
        capabilities=Capabilities(mergeable=True, identity_at_init=True),
        default_targets=["attn.k", "attn.v", "mlp.down"],
        peft=IA3PeftCodec(),
        description="(IA)³: learned vectors scaling key/value outputs and the feed-forward input.",
    )
