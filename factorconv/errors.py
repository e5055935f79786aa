"""The one exception type users see: its message names the problem and the fix, on one line."""


class FactorConvError(Exception):
    """A problem with the user's input or environment, reported without a traceback by the CLI."""
