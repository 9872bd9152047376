"""The one exception type a user can cause; the CLI prints it as one line and exits non-zero."""


class EdgeftError(Exception):
    """A user-facing error: the message names the file, field or value and what to do about it."""
