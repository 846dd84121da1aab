"""The one error type the command line turns into a one-line message and exit code 2."""
from __future__ import annotations


class UsageError(ValueError):
    """Bad input from the user (a file, a column, an option); the message says what and how to fix it."""
