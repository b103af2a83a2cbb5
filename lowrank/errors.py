"""Errors a user can fix. The command line prints them as one line and exits with code 2."""


class UsageError(ValueError):
    """Bad input (a path, a name, an option value): the message says what is wrong and what to do."""


def first_line(error: BaseException) -> str:
    """``"Type: first line of the message"``: enough of a library's exception to quote in a one-line error."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__
