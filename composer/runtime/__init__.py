"""Runtime modules that replace parts of a model while a composition is applied."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from .state import CallScope, CallState


@dataclass(frozen=True, eq=False)
class SiteBuild:
    """What the ``build_site`` hook receives about a site to build."""

    path: str
    family: str
    plan: Any  # adapter_composer.pipeline.plan.SitePlan
    program: nn.Module  # the compiled runtime tree of ops and operators
    state: CallScope  # give it to the built site as ``site.state``; ``state.current()`` is the call's CallState
    kinds: frozenset[str]
    info: Any = None  # a adapter_composer.sites.SiteInfo of the site (shapes, role, layer)


class SharedRef:
    """A reference to a module shared by several sites, safe to keep as an attribute.

    Shared modules live in the model's ``adapter_composer`` container (so ``.to()``,
    ``parameters()`` and distributed wrappers see them once); a site module keeps a
    ``SharedRef`` instead of the module itself, so the module is not registered twice.
    Call it to get the module: ``self.shared().weights``.
    """

    __slots__ = ("_module",)

    def __init__(self, module: nn.Module):
        self._module = module

    def __call__(self) -> nn.Module:
        return self._module

    def __repr__(self) -> str:
        return f"SharedRef({type(self._module).__name__})"


class Container(nn.Module):
    """Attached to a composed model as ``adapter_composer``: modules shared by many sites
    (a method's shared tensors, an operator's weights or routers) and model-level sites."""

    def __init__(self) -> None:
        super().__init__()
        self.methods = nn.ModuleDict()
        self.operators = nn.ModuleDict()
        self.model_sites = nn.ModuleDict()

    def is_empty(self) -> bool:
        return not (len(self.methods) or len(self.operators) or len(self.model_sites))


CONTAINER_ATTR = "adapter_composer"

__all__ = ["CONTAINER_ATTR", "CallScope", "CallState", "Container", "SharedRef", "SiteBuild"]
