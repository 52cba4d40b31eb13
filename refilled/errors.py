"""The one exception type for bad user input.

Anything the user can fix (a bad config value, a missing data folder, a wrong
checkpoint) raises `UserError` with a one-line message that says what is wrong
and how to fix it. The command line turns it into that line on stderr and
exit code 2, with no traceback.
"""


class UserError(Exception):
    """Bad input the user can fix; its message is one line."""


class Diverged(RuntimeError):
    """A training loss became NaN or infinite; the run cannot go on."""
