"""The one exception type users see: its message names the problem and the fix, on one line."""

import re
from collections.abc import Callable

from pydantic import ValidationError


class FactorConvError(Exception):
    """A problem with the user's input or environment, reported without a traceback by the CLI."""


def first_of(names: list[str]) -> str:
    """'a' or 'a and 3 more': a list named in a one-line message."""
    return names[0] + (f" and {len(names) - 1} more" if len(names) > 1 else "")


_PLACEHOLDER = re.compile(r"\{([a-z][a-z0-9_]*)\}")


class OptionError(FactorConvError, ValueError):
    """A problem with the value of one or more options, whose message names them as `{field}` placeholders so that
    each layer phrases them as its users type them: `str()` is the command line's (`--kv-budget`, also what
    Python callers see), `phrase(recipe_key)` a recipe's (`target.kv_budget`). A ValueError too, so pydantic
    validators raise it and keep it in the validation error's context."""

    def __init__(self, template: str) -> None:
        self.template = template
        super().__init__(self.phrase(flag))

    def phrase(self, name_of: Callable[[str], str]) -> str:
        """The message with every option named by `name_of(field)` (other text in braces is left as it is)."""
        return _PLACEHOLDER.sub(lambda match: name_of(match.group(1)), self.template)


def option(field: str) -> str:
    """The placeholder naming option `field` in an OptionError's message."""
    return "{" + field + "}"


def flag(field: str) -> str:
    """How the command line spells option `field`: kv_budget -> --kv-budget."""
    return "--" + field.replace("_", "-")


def option_error_of(err: ValidationError) -> OptionError | None:
    """The OptionError behind a pydantic ValidationError's first problem, if that is what a validator raised."""
    found = (err.errors()[0].get("ctx") or {}).get("error")
    return found if isinstance(found, OptionError) else None
