"""The installed distribution's version (``0+source`` when run from an uninstalled tree)."""

from __future__ import annotations

import importlib.metadata as _md

try:
    __version__ = _md.version("adapter-composer")
except _md.PackageNotFoundError:  # pragma: no cover - only without an install
    __version__ = "0+source"

__all__ = ["__version__"]
