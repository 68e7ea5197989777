"""Errors raised while building a registry."""

from __future__ import annotations


class RegistryError(Exception):
    """A registry cannot be built or queried as asked (unknown name, clash)."""


class PluginError(RegistryError):
    """A plugin is broken: it failed to import, violates a hookspec, or registered bad data.

    The message always names the plugin (or entry point), the hook and what is wrong.
    """
