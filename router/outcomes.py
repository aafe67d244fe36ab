"""How a run or a task ended, as a gRPC status code name: what its metrics count and its span says.

One mapping for both: a run ends by what its controller raised, a task by what its worker answered, and
either may be cancelled. A cancel (the client's, or a controller's early stop) marks the span but is
not an error.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
from opentelemetry import trace

from controllers.runtime import EarlyStop, TaskFailed
from trellis_rpc.errors import StatusError


def status_code(name: str) -> grpc.StatusCode:
    """A controller's status name ('UNAVAILABLE') as a code; UNKNOWN for a name gRPC does not have."""
    return getattr(grpc.StatusCode, name, grpc.StatusCode.UNKNOWN)


def classify(exc: BaseException) -> tuple[str, str]:
    """(status code name, message) for how an exception ends a run or a task. A run's controller errors
    reach it as StatusErrors (router/runs.py converts them at the controller's edge)."""
    if isinstance(exc, (EarlyStop, asyncio.CancelledError)):
        return "CANCELLED", ""
    if isinstance(exc, TaskFailed):
        return exc.failure.code, exc.failure.message
    if isinstance(exc, StatusError):
        return exc.code.name, exc.message
    return "INTERNAL", repr(exc)


@dataclass
class Outcome:
    code: str = "OK"


@contextlib.contextmanager
def outcome(span: trace.Span) -> Iterator[Outcome]:
    """Records how the block ended in the Outcome it yields and on the span; exceptions pass through."""
    ended = Outcome()
    try:
        yield ended
    except (Exception, asyncio.CancelledError) as exc:
        ended.code, message = classify(exc)
        if isinstance(exc, EarlyStop):
            span.set_attribute("trellis.stopped_early", True)   # the controller's stop_when fired
        elif isinstance(exc, asyncio.CancelledError):
            span.set_attribute("trellis.cancelled", True)
        else:
            span.set_status(trace.Status(trace.StatusCode.ERROR, f"{ended.code}: {message}"))
        raise
