"""structlog setup: JSON lines when not on a terminal (production), a readable renderer on one."""

from __future__ import annotations

import logging
import os
import sys

import structlog


def configure_logging(process: str, level: str | None = None) -> None:
    level_name = (level or os.environ.get("TRELLIS_LOG_LEVEL", "INFO")).upper()
    fmt = os.environ.get("TRELLIS_LOG_FORMAT") or ("console" if sys.stderr.isatty() else "json")
    renderer = structlog.dev.ConsoleRenderer() if fmt == "console" else structlog.processors.JSONRenderer()
    logging.basicConfig(level=level_name, stream=sys.stderr, format="%(message)s")
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level_name)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(process=process)
