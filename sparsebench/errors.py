"""The one exception type for user mistakes.

Anything raised as `UserError` reaches the terminal as a single line and a non-zero exit
(see `cli.py`); every other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A bad value, path or option supplied by the user; its message is one complete line."""
