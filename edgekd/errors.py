"""The one exception type the CLI turns into a one-line message (problem, then the fix)."""


class EdgeKDError(Exception):
    """A user-facing error: what is wrong and how to fix it, in one line."""
