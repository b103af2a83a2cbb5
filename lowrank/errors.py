"""Errors a user can fix. The command line prints them as one line and exits with code 2."""


class UsageError(ValueError):
    """Bad input (a path, a name, an option value): the message says what is wrong and what to do."""
