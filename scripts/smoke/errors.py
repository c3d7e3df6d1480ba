"""The error of every smoke step."""

from __future__ import annotations


class SmokeError(RuntimeError):
    """A smoke step failed; the message says which and why."""
