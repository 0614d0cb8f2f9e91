"""The one exception type that the command line turns into a one-line message."""


class UserError(Exception):
    """Bad input a user can fix: the message names what was wrong and how to fix it.

    The CLI prints it as a single ``error: ...`` line and exits with status 2; any other
    exception is a bug and keeps its traceback.
    """
