"""The one exception type that the command line turns into a one-line message, and how such a
message quotes the error of a library beneath it."""


class UserError(Exception):
    """Bad input a user can fix: the message names what was wrong and how to fix it.

    The CLI prints it as a single ``error: ...`` line and exits with status 2; any other
    exception is a bug and keeps its traceback.
    """


def first_line(exc: BaseException) -> str:
    """The first line of an error's message, or its type's name where it has none: a one-line
    reason to quote inside a :class:`UserError` (a library's message can run to pages)."""
    message = str(exc).strip()
    return message.splitlines()[0] if message else type(exc).__name__
