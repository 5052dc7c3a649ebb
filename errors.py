"""The exception the command line turns into one ``error:`` line (exit status 2)."""


class UserError(Exception):
    """A mistake in the command line or the files it names; printed without traceback."""
