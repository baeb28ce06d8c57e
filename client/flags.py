"""Library messages name fields (``sample_ms must be…``); a command line names its flags (``--sample-ms must
be…``). One rewording for both command lines, ``ofa`` and ``ofa-client``: standard library only."""
from __future__ import annotations

from typing import Any, Callable

__all__ = ["flag_errors"]


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
