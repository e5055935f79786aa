"""The one exception type users see: its message names the problem and the fix, on one line."""


class FactorConvError(Exception):
    """A problem with the user's input or environment, reported without a traceback by the CLI."""


def first_of(names: list[str]) -> str:
    """'a' or 'a and 3 more': a list named in a one-line message."""
    return names[0] + (f" and {len(names) - 1} more" if len(names) > 1 else "")
