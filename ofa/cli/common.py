"""What the ``ofa`` commands share: the table's row type, and library messages re-worded to name flags."""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from typing import Callable

__all__ = ["Command", "configure_logging", "flag_errors"]


@dataclass(frozen=True)
class Command:
    """One ``ofa`` command: its name and help, how it adds its arguments, and what runs it (an exit code)."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    description: str | None = None


def configure_logging(level: int = logging.INFO) -> None:
    """Log lines of the library (logger ``ofa``) on stderr, once per process (the CLI's choice, not the library's)."""
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def flag_errors(make, prefix: str = "--", errors: type[Exception] = ValueError):
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
