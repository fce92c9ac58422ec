"""The errors a user can cause: reported as their message alone (one line, exit 1), never as
a traceback, and before anything is written into a run's records."""


class UsageError(Exception):
    """A user error (an invalid option, a directory in use or held by another run): reported
    as its message alone, without a traceback, and nothing is written into a run's records."""


class ConfigError(UsageError, ValueError):
    """An invalid config value; the message names the option and the allowed values."""
