"""The exception the command line turns into one ``error:`` line (exit status 2)."""


class UserError(Exception):
    """A mistake in the command line or the files it names; printed without traceback."""


class UnsupportedModel(ValueError):
    """The model cannot be bounded: not a chain of supported layers and residual additions,
    a layer of an unsupported type, BatchNorm / Dropout in training mode, or no Linear logit
    layer at the end. The message names the module (or the traced graph's node) and what is
    accepted."""
