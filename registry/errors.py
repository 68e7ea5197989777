"""Errors raised while building a registry, and the root of every adapter-composer error.

:class:`ComposerError` lives here, in the lowest layer, so that the registry's own errors
are ComposerErrors too; :mod:`adapter_composer.errors` re-exports it with the rest of the
hierarchy.
"""

from __future__ import annotations


class ComposerError(Exception):
    """Base class of every error adapter-composer raises on purpose (see adapter_composer.errors)."""


class RegistryError(ComposerError):
    """A registry cannot be built or queried as asked (unknown name, clash)."""


class PluginError(RegistryError):
    """A plugin is broken: it failed to import, violates a hookspec, or registered bad data.

    The message always names the plugin (or entry point), the hook and what is wrong.
    """


class PluginContractError(PluginError):
    """A method's module, or a site module from ``build_site``, breaks the runtime contract
    (wrong forward signature, wrong output shape or type). Raised while composing, naming
    the plugin, the method and the site."""
