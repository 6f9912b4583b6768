"""Exceptions with messages meant for the user.

Every error a user can cause (bad names, impossible hparams, missing or corrupt files, foreign
checkpoints) is raised as a subclass of ``LotteryError``; the command line prints its message on one
line and exits non-zero instead of showing a traceback.
"""


class LotteryError(Exception):
    """Base class of errors whose message tells the user what was wrong and how to fix it."""


class DataError(LotteryError):
    """A data set is missing, truncated, corrupt or of the wrong format."""


class ConfigError(LotteryError, ValueError):
    """An hparam or argument has an impossible value; the message names the field."""


class UnknownNameError(LotteryError, KeyError):
    """A model, data set, preset or method name is not registered; the message lists the known ones."""

    def __str__(self) -> str:  # KeyError would otherwise wrap the message in quotes
        return str(self.args[0]) if self.args else ""


class CheckpointError(LotteryError):
    """A checkpoint or mask file is unreadable or belongs to another configuration."""


class NumericalError(LotteryError):
    """The loss became NaN or infinite."""


class StorageError(LotteryError, OSError):
    """A file or folder could not be written (disk full, read-only or no permission); nothing that was
    already there has been replaced by a partial file."""
