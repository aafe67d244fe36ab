"""OpenTelemetry for every Trellis process: traces configured by the standard OTEL_* variables, metrics
served on a Prometheus scrape endpoint.

    OTEL_TRACES_EXPORTER=otlp|console|none (default none)   OTEL_EXPORTER_OTLP_ENDPOINT=http://collector:4317
    OTEL_SERVICE_NAME (default: the process, e.g. trellis-router)   OTEL_BSP_*, OTEL_TRACES_SAMPLER ... as usual
    --metrics-port N or TRELLIS_METRICS_PORT=N: GET http://<host>:N/metrics (off by default)

With nothing configured the global tracer and meter providers stay OpenTelemetry's no-op proxies, so
spans and measurements cost next to nothing. Context travels as W3C trace context: in gRPC metadata on
a call, and inside each WorkerRequest (`trace_context`) because many tasks share one worker stream.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable, Mapping

from opentelemetry import context as otel_context
from opentelemetry import metrics, propagate, trace

# Latency histograms in seconds: from a loopback hop (~1 ms) to a long reasoning run (minutes).
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                     120.0, 300.0)
# Time per output token: a GPU decode step (~5 ms) to a loaded CPU worker (~1 s).
TOKEN_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)

_tracing = False
_parent_based = True       # the sampler follows the caller's decision (the default, parentbased_always_on)
_metrics_server = None


def _resource(process: str, instance: str) -> dict[str, str]:
    name = {"service.name": os.environ.get("OTEL_SERVICE_NAME", f"trellis-{process}")}
    return name | ({"service.instance.id": instance} if instance else {})


def configure_tracing(process: str, instance: str = "") -> None:
    """Install an exporting tracer provider when OTEL_TRACES_EXPORTER asks for one (once per process).
    instance: service.instance.id (a worker's id), said once per export batch instead of on every span."""
    global _tracing, _parent_based
    exporter_name = os.environ.get("OTEL_TRACES_EXPORTER", "none").strip().lower()
    if _tracing or exporter_name in ("", "none"):
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
    # The SDK reads OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG itself (default: parent-based, always on).
    from opentelemetry.sdk.trace.sampling import ParentBased

    provider = TracerProvider(resource=Resource.create(_resource(process, instance)))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _tracing = True
    _parent_based = isinstance(provider.sampler, ParentBased)


def traced_parent(carrier: Mapping[str, str] | Iterable[tuple[str, str]]) -> otel_context.Context | None:
    """The context to open a span under, from W3C headers; None when no span would be recorded: tracing
    is off, or the caller did not sample this trace and the sampler follows the caller. Skipping the
    span then saves its whole cost on a per-task path (~15 us even for a span that records nothing)."""
    if not _tracing:
        return None
    parent = extract(carrier)
    span_context = trace.get_current_span(parent).get_span_context()
    if _parent_based and span_context.is_valid and not span_context.trace_flags.sampled:
        return None
    return parent


def metrics_port_default() -> int:
    return int(os.environ.get("TRELLIS_METRICS_PORT", "0") or 0)


def add_metrics_args(p: argparse.ArgumentParser) -> None:
    """--metrics-port and --metrics-host, as every process takes them."""
    p.add_argument("--metrics-port", type=int, default=metrics_port_default(),
                   help="Prometheus metrics at http://<metrics-host>:PORT/metrics (0: off; env TRELLIS_METRICS_PORT)")
    p.add_argument("--metrics-host", default="127.0.0.1",
                   help="interface of the metrics endpoint (plain HTTP: loopback unless another is named, e.g. "
                        "0.0.0.0 for a scraper in the cluster)")


def configure_metrics(process: str, port: int, host: str = "127.0.0.1", instance: str = "") -> int:
    """Serve this process's metrics for Prometheus on host:port (port 0: off). Returns the port served."""
    global _metrics_server
    if not port or _metrics_server is not None:
        return _metrics_server.server_port if _metrics_server is not None else 0
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, MeterProvider
    from opentelemetry.sdk.resources import Resource
    from prometheus_client import start_http_server

    _metrics_server, _thread = start_http_server(port, addr=host)
    # Exemplars would cost every measurement taken inside a sampled span; the Prometheus text format drops them.
    provider = MeterProvider(metric_readers=[PrometheusMetricReader()], exemplar_filter=AlwaysOffExemplarFilter(),
                             resource=Resource.create(_resource(process, instance)))
    metrics.set_meter_provider(provider)
    return _metrics_server.server_port


def shutdown_telemetry() -> None:
    """Flush spans still queued and stop the metrics endpoint (a process about to exit)."""
    for provider in (trace.get_tracer_provider(), metrics.get_meter_provider()):
        if hasattr(provider, "shutdown"):
            provider.shutdown()
    if _metrics_server is not None:
        _metrics_server.shutdown()


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


def meter(name: str) -> metrics.Meter:
    """Instruments made before configure_metrics() still report once it runs (the API's proxy meter)."""
    return metrics.get_meter(name)


class ObservedCounter:
    """A counter kept as plain numbers per label values and reported through an OpenTelemetry
    ObservableCounter when scraped: adding costs a dict update (~0.2 us) instead of a synchronous
    Counter's ~6 us, which matters on per-task paths at thousands of tasks per second."""

    def __init__(self, owner: metrics.Meter, name: str, labels: tuple[str, ...] = (), unit: str = "",
                 description: str = "") -> None:
        self.labels = labels
        self.values: dict[tuple, float] = {}
        owner.create_observable_counter(name, callbacks=[self._observe], unit=unit, description=description)

    def add(self, amount: float = 1, *values: object) -> None:
        """values: one per label, in the order given at creation."""
        self.values[values] = self.values.get(values, 0) + amount

    def total(self, **labels: object) -> float:
        return sum(v for key, v in list(self.values.items())
                   if all(dict(zip(self.labels, key, strict=True)).get(k) == want for k, want in labels.items()))

    def _observe(self, _options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
        for key, value in list(self.values.items()):  # a copy: the event loop adds while a scrape reads
            yield metrics.Observation(value, {k: str(v).lower() if isinstance(v, bool) else v
                                              for k, v in zip(self.labels, key, strict=True)})


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


def trace_ids() -> tuple[str, str] | None:
    """(trace_id, span_id) of the current span in hex, for log lines; None outside any recorded span."""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")
