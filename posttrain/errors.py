"""Errors meant for users: each message names the problem and how to fix it."""


class PosttrainError(Exception):
    """A problem the user can fix (bad input, missing file, impossible setting)."""


class ConfigError(PosttrainError):
    """An invalid configuration. The CLI prints it and exits with code 2 before any work starts."""
