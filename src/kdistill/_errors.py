"""Message helpers shared by every validation error in kdistill."""

import difflib
from collections.abc import Iterable

__all__ = ["unknown_name_message"]


def unknown_name_message(what: str, name: str, valid: Iterable[str], fix: str = "") -> str:
    """Build "Unknown <what> 'x'. Did you mean 'y'? Available: [...]" with close matches first.

    Args:
        what: What was looked up, e.g. ``"loss"`` or ``"student layer"``.
        name: The name the user gave.
        valid: Every accepted name.
        fix: An optional sentence appended at the end, saying how to fix it.

    Returns:
        The message, listing at most 20 valid names (closest first when there are more).
    """
    choices = sorted(set(valid))
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.5)
    msg = f"Unknown {what} {name!r}."
    if close:
        msg += " Did you mean " + " or ".join(repr(c) for c in close) + "?"
    shown = choices if len(choices) <= 20 else close + [c for c in choices if c not in close][:20]
    more = "" if len(choices) <= 20 else f" (and {len(choices) - len(shown)} more)"
    msg += f" Available: {shown}{more}."
    if fix:
        msg += f" {fix}"
    return msg
