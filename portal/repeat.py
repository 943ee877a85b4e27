"""Run a command's step once, or again and again (``--watch``), for the CLI groups of every
room (``archive sync``, ``audit checkpoint``, ``audit forward``); below every CLI module, so
none of them imports another's (docs/architecture.md, "What may import what")."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import click


def run_repeatedly(step: Callable[[], None], retryable: type[Exception], *,
                   every_seconds: float, watch: bool, failure: str) -> None:
    """Run ``step`` once, or every ``every_seconds`` with ``watch``.

    A ``retryable`` failure is reported (``failure`` with ``{}`` for the error) and waits for
    the next run; run once, it exits 1.
    """
    while True:
        try:
            step()
        except retryable as exc:
            click.echo(failure.format(exc), err=True)
            if not watch:
                sys.exit(1)
        if not watch:
            return
        time.sleep(every_seconds)
