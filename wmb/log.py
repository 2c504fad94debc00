"""Structured logging: JSON lines in production, readable key=value on a terminal."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog


def configure(level: str = "INFO", json: bool | None = None) -> None:
    """Set up structlog once per process.  ``json=None`` picks JSON when stderr is not a TTY."""
    if json is None:
        json = not sys.stderr.isatty()
    renderer: Any = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    logging.basicConfig(format="%(message)s", stream=sys.stderr, level=level.upper())
    # kafka-python and pymysqlreplication are chatty at INFO; their warnings still come through.
    for noisy in ("kafka", "pymysqlreplication"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


def get(name: str, **context: Any) -> Any:
    """A logger; ``context`` is added to every line (``source=``, ``route=`` ...).

    Lazy on purpose: modules create their logger at import time, before :func:`configure` runs, and
    a ``.bind()`` here would freeze structlog's default (stdout) configuration into it.
    """
    return structlog.get_logger(name, logger_name=name, **context)
