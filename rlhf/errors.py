"""The two kinds of failure a user is told about in one line; any other exception is a bug in this code,
and the command line lets its traceback show."""


class UserError(ValueError):
    """Something the user gave is wrong (a file, a row, a setting, a path): the message says what and where."""


class RunFailure(RuntimeError):
    """The work could not finish for a reason outside the code: a full disk, a model that does not load,
    checkpoints of another run, a stop request."""
