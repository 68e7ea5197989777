"""adapter-composer's plugin system.

Build a registry explicitly with :func:`load_registry`; nothing happens at import time.
Plugins implement the hooks in :mod:`registry.hookspecs`, marked with :data:`hookimpl`.
"""

from .core import BUILTIN_PLUGINS, ENTRY_POINT_GROUP, Registry, default_registry, load_registry
from .errors import ComposerError, PluginContractError, PluginError, RegistryError
from .hookspecs import hookimpl, hookspec
from .records import (
    KINDS,
    ArchitectureRecord,
    AttentionGeometry,
    Capabilities,
    Diagnostic,
    MethodRecord,
    Module,
    OperatorRecord,
    PluginInfo,
    RuleSet,
    Slice,
    Sublayer,
)

__all__ = [
    "BUILTIN_PLUGINS",
    "ENTRY_POINT_GROUP",
    "KINDS",
    "ArchitectureRecord",
    "AttentionGeometry",
    "Capabilities",
    "ComposerError",
    "Diagnostic",
    "MethodRecord",
    "Module",
    "OperatorRecord",
    "PluginContractError",
    "PluginError",
    "PluginInfo",
    "Registry",
    "RegistryError",
    "RuleSet",
    "Slice",
    "Sublayer",
    "default_registry",
    "hookimpl",
    "hookspec",
    "load_registry",
]
