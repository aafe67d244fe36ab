"""python -m benchmarks.otlp_sink --port N: an OTLP trace collector that counts spans and drops them.

The far end of the tracing benchmark (benchmarks/router.py --only telemetry): it runs in its own process,
as a real collector would, so the router pays only for making and exporting its spans.
"""

from __future__ import annotations

import argparse
import signal
import threading
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


class CountingSink(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans = 0
        self.lock = threading.Lock()

    def Export(self, request, context):
        count = sum(len(scope.spans) for rs in request.resource_spans for scope in rs.scope_spans)
        with self.lock:
            self.spans += count
        return trace_service_pb2.ExportTraceServiceResponse()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    sink = CountingSink()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(sink, server)
    server.add_insecure_port(f"127.0.0.1:{args.port}")
    server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    server.stop(0)
    print(f"spans received: {sink.spans}", flush=True)


if __name__ == "__main__":
    main()
