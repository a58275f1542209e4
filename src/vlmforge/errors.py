"""The two errors a user's input can cause. ``vlmforge`` prints either as one line and exits 2.

They live here, below every other module, so that any layer can raise them without importing
the command line or the config loader.
"""


class UserError(Exception):
    """An error caused by the user's input (a path, a file's content, a flag): no traceback, exit code 2."""


class ConfigError(ValueError):
    """A recipe or override is invalid; the message names the key and its source."""
