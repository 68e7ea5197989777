"""Errors raised by the host. Every one of them names what is wrong and how to fix it."""

from __future__ import annotations

from collections.abc import Iterable

from adapter_composer.registry import Diagnostic


class ComposerError(Exception):
    """Base class of adapter-composer's errors."""


class CompositionError(ComposerError):
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


class AdapterFileError(ComposerError):
    """A saved composition or PEFT directory is missing, corrupted, or does not fit the model."""


class RoutingError(ComposerError):
    """A forward call's routing keys do not fit the composition (unknown key, wrong batch size)."""
