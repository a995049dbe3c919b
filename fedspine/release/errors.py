"""The two ways a release says no: unusable inputs, or a privacy gate that failed."""

from __future__ import annotations


class ReleaseError(Exception):
    """A release cannot be attempted: bad arguments, missing inputs, an existing ``out``."""


class ReleaseRefused(ReleaseError):
    """A privacy gate said no; ``reason`` is one line naming what failed."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
