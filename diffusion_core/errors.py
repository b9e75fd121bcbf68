"""The errors a user can cause, one class per kind of input. Each message is one line that names the
offending key or file; the stages print it as ``error: <message>`` and exit with status 2."""


class ConfigError(ValueError):
    """A bad value in the configuration; the message names the key."""


class DataError(RuntimeError):
    """A dataset or data file that cannot be used; the message names it and says why."""


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable or does not match; the message names the file."""


class TrackingError(RuntimeError):
    """The tracking server cannot be reached or a run file is bad; the message says which."""


USER_ERRORS = (ConfigError, DataError, CheckpointError, TrackingError, FileNotFoundError)
