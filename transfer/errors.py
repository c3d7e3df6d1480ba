"""User-facing errors of the transfer package.

Anything raised as a :class:`UserInputError` is a problem with what the user gave us (a missing
file, a bad config value, chat data for a tokenizer without a chat template). The CLI prints its
message as one line and exits with status 2; everything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserInputError(Exception):
    """Bad input from the user; the message is one self-contained line."""


class ConfigError(UserInputError):
    """An invalid configuration value or key."""


class DataError(UserInputError):
    """Unreadable or unusable training / evaluation data."""
