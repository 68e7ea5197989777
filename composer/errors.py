"""The errors adapter-composer raises. Every public call raises only these for bad input.

One hierarchy; each error names what is wrong and what to do. Where a built-in exception
type is what callers would catch, the error subclasses it too (an unknown adapter name is
a ``KeyError``, a bad value a ``ValueError``), so existing ``except`` clauses keep working::

    ComposerError                          base of everything below
    ├── RegistryError                      a registry cannot be built or queried (unknown method)
    │   └── PluginError                    a plugin is broken: import, hook contract, registered data
    │       └── PluginContractError        a plugin's modules break the runtime contract (found when composing)
    ├── ArgumentError (TypeError)          an argument of the wrong kind (a string where a model goes, ...)
    ├── CompositionError (ValueError)      a graph cannot be applied; carries every Diagnostic
    ├── AdapterBuildError (ValueError)     a method's build() failed for a site (names method, plugin, site)
    ├── UnknownNodeError (KeyError)        no node of that name in the graph
    │   └── UnknownAdapterError            no adapter of that name in the composition
    ├── UnknownSiteError (KeyError)        no site at that path in a plan
    ├── AdapterFileError (ValueError)      a directory is missing, corrupted, unsafe or does not fit the model
    │   ├── UnsafePathError                a file reference that leaves the directory
    │   └── SaveConflictError              another save to the same directory is in progress
    ├── WeightsError (ValueError)          tensors given in memory do not fit (names, shapes, dtype, NaN/Inf)
    ├── PatternError (ValueError)          a regex is invalid, too long, or takes too long to match
    ├── HotSwapError (ValueError)          a hot swap the composition cannot do (not under a route, ...)
    └── RoutingError (ValueError)          a forward call's routing keys do not fit the composition
"""

from __future__ import annotations

from collections.abc import Iterable

from adapter_composer.registry import Diagnostic
from adapter_composer.registry.errors import (
    ComposerError,
    PluginContractError,
    PluginError,
    RegistryError,
)


class CompositionError(ComposerError, ValueError):
    """A composition graph cannot be applied. Carries every diagnostic found, not just the first."""

    def __init__(self, diagnostics: Iterable[Diagnostic], context: str = ""):
        self.diagnostics: tuple[Diagnostic, ...] = tuple(diagnostics)
        head = f"{len(self.diagnostics)} problem(s) in the composition"
        if context:
            head += f" ({context})"
        body = "\n".join(d.format() for d in self.diagnostics)
        super().__init__(f"{head}:\n{body}")

    @property
    def codes(self) -> list[str]:
        return [d.code for d in self.diagnostics]


class AdapterBuildError(ComposerError, ValueError):
    """A method's ``build`` (or ``shared``) raised for one site; the message names the adapter,
    the method, the plugin and the site, and the original error is chained."""


class ArgumentError(ComposerError, TypeError):
    """A call got an argument of the wrong kind (a string where a model goes, positional model
    inputs, options a function does not take). A ``TypeError`` too."""


class UnknownSiteError(ComposerError, KeyError):
    """No site at that path in a plan. A ``KeyError`` too, with a readable message."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class UnknownNodeError(ComposerError, KeyError):
    """No node of that name. A ``KeyError`` too, with a readable message."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class UnknownAdapterError(UnknownNodeError):
    """No adapter of that name in this composition."""


class AdapterFileError(ComposerError, ValueError):
    """A saved composition or PEFT directory is missing, corrupted, unsafe or does not fit the model."""


class UnsafePathError(AdapterFileError):
    """A file named by a manifest is not a plain name inside its directory (``../x``, an
    absolute path, or a symbolic link that leaves the directory)."""


class SaveConflictError(AdapterFileError):
    """Another process or thread is saving to the same directory; nothing was written."""


class WeightsError(ComposerError, ValueError):
    """Tensors given in memory do not fit an adapter: names, shapes, dtype, or NaN/Inf values."""


class PatternError(ComposerError, ValueError):
    """A regular expression from a target or a file is invalid, too long, or too slow to match."""


class HotSwapError(ComposerError, ValueError):
    """A hot swap this composition cannot do; nothing was changed."""


class RoutingError(ComposerError, ValueError):
    """A forward call's routing keys do not fit the composition (unknown key, wrong batch size)."""


__all__ = [
    "AdapterBuildError",
    "ArgumentError",
    "AdapterFileError",
    "ComposerError",
    "CompositionError",
    "HotSwapError",
    "PatternError",
    "PluginContractError",
    "PluginError",
    "RegistryError",
    "RoutingError",
    "SaveConflictError",
    "UnknownAdapterError",
    "UnknownNodeError",
    "UnknownSiteError",
    "UnsafePathError",
    "WeightsError",
]
