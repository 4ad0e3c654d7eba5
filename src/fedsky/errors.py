"""The one exception type a user sees: a message that says what is wrong and what to do."""


class FedskyError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits with code 2."""
