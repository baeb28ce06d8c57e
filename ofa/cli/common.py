"""What the ``ofa`` commands share: the table's row type, and library messages re-worded to name flags."""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from typing import Callable

from ofa_client.flags import flag_errors  # one rewording for both command lines

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


