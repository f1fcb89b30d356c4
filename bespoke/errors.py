"""Errors a user can act on. The CLI prints their message and exits with code 2, no traceback."""


class BespokeError(Exception):
    """Base of every error bespoke raises on purpose."""


class UsageError(BespokeError):
    """Bad input: a value, a file, a name. The message says what was wrong and what to do."""


class NotImplementedYet(BespokeError):
    """A registered plugin whose implementation has not landed yet."""
