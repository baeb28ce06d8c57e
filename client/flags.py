"""Messages: library messages name fields (``sample_ms must be…``), a command line names its flags (``--sample-ms
must be…``), one rewording for both command lines, ``ofa`` and ``ofa-client``; and what a client gave is never
echoed whole (:func:`bounded`, also the server's). Standard library only."""
from __future__ import annotations

from typing import Any, Callable

__all__ = ["bounded", "flag_errors"]


def flag_errors(make: Callable[[], Any], prefix: str = "--", errors: type[Exception] = ValueError) -> Any:
    """Run ``make``; an error (of ``errors``) that starts with a field's name (``sample_ms must be…``) is re-worded
    to name its flag (``--sample-ms must be…``): library messages name fields, the CLI's name flags."""
    try:
        return make()
    except errors as e:
        text = str(e)
        field, _, rest = text.partition(" ")
        if field.isidentifier() and field.islower() and field not in ("the", "a", "an", "this") and rest:
            raise type(e)(f"{prefix}{field.replace('_', '-')} {rest}") from None
        raise


def bounded(text: str, limit: int = 1000) -> str:
    """``text`` cut to at most ``limit`` characters, saying how much was cut: a status message, a log line or a
    command line's error never carries unbounded input (a 10 MB target name once went into a server's log whole)."""
    if len(text) <= limit:
        return text
    keep = limit
    while True:  # the note's own length decides how much is kept, and so what it says: a few steps
        tail = f"... ({len(text) - keep} more characters cut)"
        if keep + len(tail) <= limit or keep == 0:
            return text[:keep] + tail[: limit - keep]
        keep = max(0, limit - len(tail))
