"""The one exception type for user mistakes.

Anything raised as `UserError` reaches the terminal as a single line and a non-zero exit
(see `cli.py`); every other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A bad value, path or option supplied by the user; its message is one complete line."""


class RunInterrupted(UserError):
    """Ctrl-C or SIGTERM stopped a run; its checkpoint is intact and a relaunch resumes it."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code  # 128 + signal number, as a shell reports a signalled process
