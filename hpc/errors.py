"""Errors that the CLI turns into one clear line and a non-zero exit code."""
from __future__ import annotations

EXIT_ERROR = 2  # bad input, bad config, refused operation
EXIT_REQUEUE = 75  # (EX_TEMPFAIL) preempted/time limit: checkpoint written, please requeue


class HpcError(Exception):
    """An expected failure: the message names the file and the problem."""

    exit_code = EXIT_ERROR


class ConfigError(HpcError, ValueError):
    """Invalid configuration or override."""


class InputError(HpcError, ValueError):
    """Bad input data: truncated file, wrong header, mismatched pair, NaNs..."""


class OutputError(HpcError):
    """Output cannot be written (exists, disk full, ...). Nothing partial is left visible."""


class DistributedError(HpcError):
    """Another rank of a distributed run went away (crashed, killed): this rank stops too."""

    exit_code = 1


class HpcWarning(UserWarning):
    """Something the user should know that does not stop the command (the CLI prints one line)."""
