"""The error of the bench scripts that start a server and drive a client against it."""

from __future__ import annotations


class DownstreamError(RuntimeError):
    """A bench run that cannot go on; the message is one line naming the problem."""
