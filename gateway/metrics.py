"""The gateway's metrics (Prometheus through OpenTelemetry, like every Trellis process)."""

from __future__ import annotations

from trellis_rpc.telemetry import ObservedCounter, meter


class GatewayMetrics:
    def __init__(self) -> None:
        m = meter("trellis.gateway")
        self.requests = ObservedCounter(m, "trellis_gateway_requests", ("route", "status"),
                                        description="HTTP requests by route and status")
        self.chunks = ObservedCounter(m, "trellis_gateway_stream_chunks", (),
                                             description="SSE chunks streamed to clients")
        self.seconds = m.create_histogram("trellis_gateway_request_seconds", unit="s",
                                          description="request duration, to the last byte of a stream")

    def request(self, route: str, status: int, seconds: float) -> None:
        self.requests.add(1, route, status)
        self.seconds.record(seconds, {"route": route})
