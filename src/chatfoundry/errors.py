"""Errors a user can cause. The CLI prints them as one line and exits with status 2."""


class UserError(Exception):
    """Bad input (missing file, malformed line, bad config value): one line naming what is wrong."""
