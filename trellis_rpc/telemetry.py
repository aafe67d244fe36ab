"""OpenTelemetry tracing for every Trellis process, configured by the standard OTEL_* variables.

    OTEL_TRACES_EXPORTER=otlp|console|none (default none)   OTEL_EXPORTER_OTLP_ENDPOINT=http://collector:4317
    OTEL_SERVICE_NAME (default: the process, e.g. trellis-router)   OTEL_BSP_SCHEDULE_DELAY ... as usual

With no exporter configured the global tracer provider stays OpenTelemetry's no-op one, so spans cost
next to nothing. Context travels as W3C trace context: in gRPC metadata on a call, and inside each
WorkerRequest (`trace_context`) because many tasks share one worker stream.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

_configured = False


def configure_tracing(process: str) -> None:
    """Install an exporting tracer provider when OTEL_TRACES_EXPORTER asks for one (once per process)."""
    global _configured
    exporter_name = os.environ.get("OTEL_TRACES_EXPORTER", "none").strip().lower()
    if _configured or exporter_name in ("", "none"):
        return
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    if exporter_name == "console":
        exporter = ConsoleSpanExporter()
    elif exporter_name == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()  # endpoint, headers, insecure...: OTEL_EXPORTER_OTLP_* variables
    else:
        raise SystemExit(f"OTEL_TRACES_EXPORTER={exporter_name!r}: Trellis supports otlp, console or none")
    service = os.environ.get("OTEL_SERVICE_NAME", f"trellis-{process}")
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _configured = True


def shutdown_tracing() -> None:
    """Flush spans still queued (a process about to exit)."""
    provider = trace.get_tracer_provider()
    if hasattr(provider, "shutdown"):
        provider.shutdown()


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


def inject() -> dict[str, str]:
    """The current context as W3C headers (traceparent, tracestate)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def extract(carrier: Mapping[str, str] | Iterable[tuple[str, str]] | None) -> otel_context.Context:
    """A context from W3C headers: a dict (WorkerRequest.trace_context) or gRPC invocation metadata."""
    if carrier is None:
        return otel_context.get_current()
    if not isinstance(carrier, Mapping):
        carrier = {k: v for k, v in carrier if isinstance(v, str)}
    return propagate.extract(carrier)
