"""What both sides of a run read from Flower's Context: the checked run config, and the
console logging the app's output shows."""

from __future__ import annotations

import logging
import sys

from flwr.app import Context

from fed_crash.config import RunConfig, parse_run_config


def run_config(context: Context) -> RunConfig:
    """The run's configuration, checked (unknown keys and wrong types fail here, by name)."""
    console_logging()
    return parse_run_config(dict(context.run_config))


def console_logging() -> None:
    """Show the library's INFO lines (one per round on the server, and the strategies' lines
    on failed clients) in the app's output."""
    for name in ("fed_crash", "strategies"):
        lib = logging.getLogger(name)
        if not lib.handlers:
            handler = logging.StreamHandler(sys.stdout)
            handler.setFormatter(logging.Formatter("%(levelname)s fed_crash: %(message)s"))
            lib.addHandler(handler)
            lib.setLevel(logging.INFO)
            lib.propagate = False
