"""Runtime modules that replace parts of a model while a composition is applied."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from .state import CallState


@dataclass(frozen=True, eq=False)
class SiteBuild:
    """What the ``build_site`` hook receives about a site to build."""

    path: str
    family: str
    plan: Any  # composer.plan.SitePlan
    program: nn.Module  # the compiled runtime tree of ops and operators
    state: CallState
    kinds: frozenset[str]
    info: Any = None  # a composer.sites.SiteInfo of the site (shapes, role, layer)


__all__ = ["CallState", "SiteBuild"]
