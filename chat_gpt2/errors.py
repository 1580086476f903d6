"""The project's own error types: what a user can fix (a bad flag, file, record or checkpoint).

The scripts print these as one line, `error: ...`, and exit 1 (configurator.run); any other
exception is a bug and keeps its traceback. Each also derives from the builtin it stands for, so
`except ValueError` still catches a bad value and `except FileNotFoundError` a missing file.
"""


class UserError(Exception):
    """Something the user can fix; the message says what and where."""


class ConfigError(UserError, ValueError):
    """A bad config file, flag or option value; the message names the file, flag or key."""


class InputError(UserError, ValueError):
    """Input data that cannot be used (a missing or unreadable file, a
    malformed prepared dataset)."""


class RecordError(InputError):
    """One input record that cannot be used; `where` is 'file:line' or
    'file[index] (line N)'. Skippable."""

    def __init__(self, where, message, reason):
        super().__init__(f"{where}: {message}")
        self.reason = reason  # short category, counted in the summary when --skip_invalid


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the command needs does not exist (no
    checkpoint yet, no prepared dataset)."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be read or used."""


class PretrainedError(UserError, RuntimeError):
    """A pretrained checkpoint that cannot be found or used; the
    message says what was tried and what to do."""


class ResourceError(UserError, RuntimeError):
    """The run does not fit the device (memory); the message says what to change."""


class JudgeError(UserError, RuntimeError):
    """The external judge of eval.py (a command or an endpoint) failed or gave no score."""


class OutputExistsError(UserError, FileExistsError):
    """An output path that holds something the command will not overwrite (without --force)."""


class DivergedError(UserError, RuntimeError):
    """Training produced a non-finite loss; the message names the iteration and what to try."""


class OutputError(UserError, OSError):
    """An output that cannot be written (disk full, read-only); what
    was there before is untouched."""
