"""structlog setup: JSON lines when not on a terminal (production), a readable renderer on one.

Every line carries the process, and inside a traced span its trace_id and span_id, so a log search and
a trace view meet; the router binds run_id for the lines of a run (structlog.contextvars).
"""

from __future__ import annotations

import logging
import os
import sys

import structlog

from trellis_rpc.telemetry import trace_ids


def add_trace_ids(_logger: object, _method: str, event: dict) -> dict:
    ids = trace_ids()
    if ids is not None:
        event.setdefault("trace_id", ids[0])
        event.setdefault("span_id", ids[1])
    return event


def configure_logging(process: str, level: str | None = None) -> str:
    """Returns the format chosen: "json" or "console"."""
    level_name = (level or os.environ.get("TRELLIS_LOG_LEVEL", "INFO")).upper()
    fmt = os.environ.get("TRELLIS_LOG_FORMAT") or ("console" if sys.stderr.isatty() else "json")
    renderer = structlog.dev.ConsoleRenderer() if fmt == "console" else structlog.processors.JSONRenderer()
    logging.basicConfig(level=level_name, stream=sys.stderr, format="%(message)s")
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            add_trace_ids,
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
    return fmt
