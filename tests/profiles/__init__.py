"""Conformance profiles: one module per registered method, each defining ``PROFILE``.

The battery in ``tests/plugins/test_conformance.py`` runs over every method the registry
knows and fails for a method without a profile here, so a new method cannot skip it.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Profile:
    method: str
    config: dict[str, Any]  # keyword arguments for Graph.adapter (targets included)
    expected_params: Callable[[Any], int]  # the paper's formula, from the (unpatched) model
    arch: str = "llama"  # which tiny model (tests.models.BUILDERS)
    lr: float = 1e-2  # learning rate for the training smoke test
    steps: int = 30
    formula: str = ""  # the formula, for the report
    extra: dict[str, Any] = field(default_factory=dict)


def load_profiles() -> dict[str, Profile]:
    out: dict[str, Profile] = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        profile = getattr(module, "PROFILE", None)
        if profile is not None:
            out[profile.method] = profile
    return out
