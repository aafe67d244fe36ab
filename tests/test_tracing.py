"""One trace across processes: the client's span, the router's run and its task spans, the worker's task
spans, exported by OTLP to a collector started here (a gRPC server implementing the OTLP trace service)."""

from __future__ import annotations

import secrets
import threading
import time
from concurrent import futures

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from client.launcher import free_port, start_router, start_worker
from tests.helpers import run_request
from trellis_rpc.v1 import router_pb2_grpc


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans: list[tuple[str, object]] = []   # (service name, span)
        self.lock = threading.Lock()

    def Export(self, request, context):
        with self.lock:
            for resource_spans in request.resource_spans:
                service = next((a.value.string_value for a in resource_spans.resource.attributes
                                if a.key == "service.name"), "")
                for scope in resource_spans.scope_spans:
                    self.spans.extend((service, span) for span in scope.spans)
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture
def collector():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    sink = Collector()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(sink, server)
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    yield sink, port
    server.stop(0)


def test_one_trace_spans_client_router_and_worker(tiny_model, logs, collector):
    sink, port = collector
    env = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
           "OTEL_EXPORTER_OTLP_INSECURE": "true", "OTEL_BSP_SCHEDULE_DELAY": "100"}
    worker = start_worker(str(tiny_model), logs, name="traced-worker", extra=["--threads", "1"], env=env)
    router = None
    try:
        worker.wait_serving(timeout=120)
        router = start_router([worker.address], logs, name="traced-router", env=env)
        router.wait_serving(timeout=60)
        trace_id, client_span = secrets.token_hex(16), secrets.token_hex(8)
        with grpc.insecure_channel(router.address) as channel:
            result = router_pb2_grpc.RouterStub(channel).Run(
                run_request("budget_majority_vote", params={"n": 3}, max_tokens=6, seed=1), timeout=60,
                metadata=(("traceparent", f"00-{trace_id}-{client_span}-01"),))
        assert result.usage.tasks == 3
        deadline = time.monotonic() + 15
        while True:
            with sink.lock:
                ours = [(svc, s) for svc, s in sink.spans if s.trace_id.hex() == trace_id]
            names = sorted(s.name for _, s in ours)
            if names.count("worker.generate") == 3 and "router.run" in names or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        for proc in (router, worker):
            if proc is not None:
                proc.stop()
    by_name: dict[str, list] = {}
    for svc, span in ours:
        by_name.setdefault(span.name, []).append((svc, span))
    assert sorted(by_name) == ["router.generate", "router.run", "worker.generate"], sorted(by_name)
    (run_service, run_span), = by_name["router.run"]
    assert run_service == "trellis-router" and run_span.parent_span_id.hex() == client_span
    tasks = by_name["router.generate"]
    assert len(tasks) == 3 and all(s.parent_span_id == run_span.span_id for _, s in tasks)
    task_ids = {s.span_id for _, s in tasks}
    work = by_name["worker.generate"]
    assert len(work) == 3 and all(svc == "trellis-worker" for svc, _ in work)
    assert {s.parent_span_id for _, s in work} == task_ids        # each worker span under its dispatch
    tokens = [a.value.int_value for _, s in work for a in s.attributes if a.key == "trellis.completion_tokens"]
    assert len(tokens) == 3 and all(t >= 1 for t in tokens)
