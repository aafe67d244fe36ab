"""Observability across real processes: one trace from the client through the router's run, controller
steps and dispatches to the worker's task phases, exported by OTLP to a collector started here (a gRPC
server implementing the OTLP trace service); spans that end on cancel; Prometheus metrics scraped from
both processes; JSON log lines that carry the run's trace id."""

from __future__ import annotations

import contextlib
import json
import secrets
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from client.launcher import free_port, start_gateway, start_router, start_worker
from tests.helpers import run_request
from trellis_rpc.v1 import router_pb2_grpc

# Starts workers and routers: the slower half of the suite.
pytestmark = pytest.mark.processes


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

    def trace(self, trace_id: str, done, timeout: float = 15.0) -> list[tuple[str, object]]:
        """The spans of one trace, once done(spans) holds (BatchSpanProcessor exports every 100 ms here)."""
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                ours = [(svc, s) for svc, s in self.spans if s.trace_id.hex() == trace_id]
            if done([s for _, s in ours]) or time.monotonic() > deadline:
                return ours
            time.sleep(0.2)


def attrs(span) -> dict:
    out = {}
    for a in span.attributes:
        value = a.value
        out[a.key] = getattr(value, value.WhichOneof("value"))
    return out


def names(spans) -> list[str]:
    return sorted(s.name for s in spans)


@contextlib.contextmanager
def collector() -> Iterator[tuple[Collector, dict[str, str]]]:
    """An OTLP trace collector on a free port, and the environment that makes a process export to it."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    sink = Collector()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(sink, server)
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    try:
        yield sink, {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
                     "OTEL_EXPORTER_OTLP_INSECURE": "true", "OTEL_BSP_SCHEDULE_DELAY": "100"}
    finally:
        server.stop(0)


@pytest.fixture(scope="module")
def stack(tiny_model, logs):
    """A collector, then a worker and a router that export to it, serve metrics and log JSON."""
    with collector() as (sink, env):
        worker_metrics, router_metrics = free_port(), free_port()
        worker = start_worker(str(tiny_model), logs, name="observed-worker", env=env, extra=[
            "--threads", "1", "--metrics-port", str(worker_metrics), "--metrics-host", "127.0.0.1"])
        router = None
        try:
            worker.wait_serving(timeout=120)
            router = start_router([worker.address], logs, name="observed-router", env=env,
                                  extra=["--metrics-port", str(router_metrics), "--metrics-host", "127.0.0.1"])
            router.wait_serving(timeout=60)
            yield {"sink": sink, "router": router, "worker": worker, "env": env,
                   "metrics": {"router": router_metrics, "worker": worker_metrics}}
        finally:
            for proc in (router, worker):
                if proc is not None:
                    proc.stop()


def traced(trace_id: str, span_id: str) -> tuple[tuple[str, str]]:
    return (("traceparent", f"00-{trace_id}-{span_id}-01"),)


def test_one_trace_from_client_to_worker_phases(stack):
    trace_id, client_span = secrets.token_hex(16), secrets.token_hex(8)
    with grpc.insecure_channel(stack["router"].address) as channel:
        result = router_pb2_grpc.RouterStub(channel).Run(
            run_request("majority_vote", params={"n": 3, "inner": "native_generation"}, max_tokens=6, seed=1),
            timeout=60, metadata=traced(trace_id, client_span))
    assert result.usage.tasks == 3
    ours = stack["sink"].trace(trace_id, lambda spans: names(spans).count("worker.prefill") == 3
                               and "router.run" in names(spans))
    by_name: dict[str, list] = {}
    for svc, span in ours:
        by_name.setdefault(span.name, []).append((svc, span))
    assert {"router.run", "controller.step", "router.generate", "worker.generate", "worker.queue",
            "worker.prefill"} <= set(by_name), sorted(by_name)
    assert all(s.end_time_unix_nano >= s.start_time_unix_nano > 0 for _, s in ours)

    (run_service, run_span), = by_name["router.run"]
    assert run_service == "trellis-router" and run_span.parent_span_id.hex() == client_span
    assert attrs(run_span)["trellis.outcome"] == "OK"

    # The vote is one step of three branches; each branch's own controller takes one step of one task.
    steps = {attrs(s)["trellis.controller"]: s for _, s in by_name["controller.step"]}
    top = steps.pop("majority_vote")
    assert top.parent_span_id == run_span.span_id and attrs(top)["trellis.tasks"] == 3
    assert sorted(steps) == [f"sample/{i}/native_generation" for i in range(3)]
    assert all(s.parent_span_id == top.span_id for s in steps.values())

    dispatches = [s for _, s in by_name["router.generate"]]
    assert sorted(s.parent_span_id for s in dispatches) == sorted(s.span_id for s in steps.values())
    assert all(attrs(s)["trellis.worker"] == stack["worker"].address for s in dispatches)

    work = by_name["worker.generate"]
    assert all(svc == "trellis-worker" for svc, _ in work)
    assert sorted(s.parent_span_id for _, s in work) == sorted(s.span_id for s in dispatches)
    assert all(attrs(s)["trellis.completion_tokens"] >= 1 for _, s in work)
    work_ids = {s.span_id for _, s in work}
    for phase in ("worker.queue", "worker.prefill"):
        assert sorted(s.parent_span_id for _, s in by_name[phase]) == sorted(work_ids)
    assert all(attrs(s)["trellis.batch_size"] >= 1 for _, s in by_name["worker.prefill"])
    for _, decode in by_name.get("worker.decode", []):
        assert decode.parent_span_id in work_ids and attrs(decode)["trellis.steps"] >= 1


def test_spans_of_a_cancelled_run_end(stack):
    """The client walks away mid-stream: the run's, the dispatch's and the worker's spans still end, marked."""
    trace_id, client_span = secrets.token_hex(16), secrets.token_hex(8)
    with grpc.insecure_channel(stack["router"].address) as channel:
        call = router_pb2_grpc.RouterStub(channel).RunStream(
            run_request(max_tokens=240, ignore_eos=True), timeout=60, metadata=traced(trace_id, client_span))
        for event in call:
            if event.WhichOneof("event") == "delta":
                call.cancel()
                break
    ours = stack["sink"].trace(trace_id, lambda spans: {"router.run", "worker.generate"} <= set(names(spans)))
    spans = {s.name: s for _, s in ours}
    assert attrs(spans["router.run"])["trellis.outcome"] == "CANCELLED"
    assert attrs(spans["router.generate"]).get("trellis.cancelled") is True
    worker = spans["worker.generate"]
    assert attrs(worker)["trellis.status_code"] == "CANCELLED"
    assert attrs(worker)["trellis.completion_tokens"] < 240


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} from a Prometheus text endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items()
                                  if k not in ("otel_scope_name", "otel_scope_version", "otel_scope_schema_url")))
            samples[(sample.name, labels)] = sample.value
    return samples


def total(samples: dict, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


def test_metrics_count_what_a_run_did(stack):
    router_port, worker_port = stack["metrics"]["router"], stack["metrics"]["worker"]
    before_router, before_worker = scrape(router_port), scrape(worker_port)
    with grpc.insecure_channel(stack["router"].address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        request = run_request("majority_vote", params={"n": 3}, max_tokens=5, seed=2, ignore_eos=True)
        result = stub.Run(request, timeout=60)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Run(run_request("no_such_controller"), timeout=10)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    router, worker = scrape(router_port), scrape(worker_port)

    def grew(after, before, name, **labels) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    tokens = result.usage.completion_tokens
    assert grew(router, before_router, "trellis_router_runs_total", controller="majority_vote", code="OK") == 1
    assert grew(router, before_router, "trellis_router_runs_total", controller="unknown",
                code="INVALID_ARGUMENT") == 1
    assert grew(router, before_router, "trellis_router_tasks_total", kind="generate", code="OK") == 1
    assert grew(router, before_router, "trellis_router_completion_tokens_total") == tokens
    assert grew(router, before_router, "trellis_router_run_duration_seconds_count",
                controller="majority_vote") == 1
    assert grew(router, before_router, "trellis_router_run_time_to_first_token_seconds_count") == 1
    assert grew(router, before_router, "trellis_router_routing_decisions_total", policy="kv") == 1
    assert total(router, "trellis_router_workers", state="ready") == 1
    assert total(router, "trellis_router_runs_running") == 0

    assert grew(worker, before_worker, "trellis_worker_tasks_total", kind="generate", code="OK") == 1
    assert grew(worker, before_worker, "trellis_worker_completion_tokens_total") == tokens
    assert grew(worker, before_worker, "trellis_worker_prompt_tokens_total") == result.usage.prompt_tokens
    assert grew(worker, before_worker, "trellis_worker_time_to_first_token_seconds_count") == 1
    assert grew(worker, before_worker, "trellis_worker_time_per_output_token_seconds_count") == 1
    assert total(worker, "trellis_worker_kv_blocks_free") > 0
    assert total(worker, "trellis_worker_running_sequences") == 0
    assert 0.0 <= total(worker, "trellis_worker_prefix_cache_hit_ratio") <= 1.0


def test_log_lines_are_json_and_carry_the_trace(stack):
    trace_id, client_span = secrets.token_hex(16), secrets.token_hex(8)
    with grpc.insecure_channel(stack["router"].address) as channel:
        result = router_pb2_grpc.RouterStub(channel).Run(run_request(max_tokens=3), timeout=60,
                                                          metadata=traced(trace_id, client_span))
    deadline = time.monotonic() + 10
    while True:
        lines = stack["router"].log_path.read_text().splitlines()
        records = [json.loads(line) for line in lines]   # every line is one JSON object
        runs = [r for r in records if r["event"] == "run" and r.get("run_id") == result.run_id]
        if runs or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    (line,) = runs
    assert line["trace_id"] == trace_id and line["level"] == "info" and line["outcome"] == "OK"
    assert line["total_ms"] > 0 and line["completion_tokens"] == result.usage.completion_tokens
    for record in (json.loads(x) for x in stack["worker"].log_path.read_text().splitlines()):
        assert record["process"] == "worker_cpu" and "event" in record


def test_gateway_joins_the_callers_trace_and_counts_its_requests(stack, logs):
    """An HTTP caller's traceparent: the gateway's span is its child, the router's run the gateway's."""
    import httpx

    metrics = free_port()
    gateway = start_gateway(stack["router"].address, logs, name="observed-gateway", env=stack["env"],
                            extra=["--metrics-port", str(metrics), "--metrics-host", "127.0.0.1"])
    try:
        gateway.wait_serving(timeout=60)
        trace_id, client_span = secrets.token_hex(16), secrets.token_hex(8)
        for stream in (False, True):
            reply = httpx.post(f"http://{gateway.address}/v1/chat/completions", timeout=60,
                               headers=dict(traced(trace_id, client_span)),
                               json={"model": "native_generation", "max_tokens": 3, "stream": stream,
                                     "messages": [{"role": "user", "content": "hi"}]})
            assert reply.status_code == 200
        ours = stack["sink"].trace(trace_id, lambda spans: names(spans).count("router.run") == 2
                                   and names(spans).count("gateway chat.completions") == 2)
        gateway_spans = [s for svc, s in ours if s.name == "gateway chat.completions"]
        assert len(gateway_spans) == 2 and all(s.parent_span_id.hex() == client_span for s in gateway_spans)
        runs = [s for _, s in ours if s.name == "router.run"]
        assert sorted(s.parent_span_id for s in runs) == sorted(s.span_id for s in gateway_spans)
        assert {svc for svc, s in ours if s.name.startswith("gateway")} == {"trellis-gateway"}
        samples = scrape(metrics)
        assert total(samples, "trellis_gateway_requests_total", route="chat.completions", status="200") == 2
        assert total(samples, "trellis_gateway_stream_chunks_total") >= 2
        logged = [json.loads(line) for line in gateway.log_path.read_text().splitlines() if line.startswith("{")]
        requests = [e for e in logged if e.get("event") == "request"]
        assert len(requests) == 2 and all(e["trace_id"] == trace_id for e in requests)
    finally:
        gateway.stop()


def test_each_task_carries_its_run_and_what_the_run_had_consumed(stack):
    """The router's per-run accounting reaches the worker with every task (RunContext), as its spans show: the
    tasks of one run share a run id, and each later task was sent with the tokens and tasks of those before."""
    trace_id = secrets.token_hex(16)
    with grpc.insecure_channel(stack["router"].address) as channel:
        result = router_pb2_grpc.RouterStub(channel).Run(
            run_request("beam_search", params={"beam_width": 1, "expansions": 1, "max_steps": 3, "kind": "verifier",
                                               "max_step_tokens": 4}, max_tokens=4, seed=3),
            timeout=120, metadata=traced(trace_id, secrets.token_hex(8)))
    tasks = result.usage.tasks
    ours = stack["sink"].trace(trace_id, lambda spans: sum(s.name.startswith("worker.") and s.name in (
        "worker.generate", "worker.score") for s in spans) >= tasks)
    worker_tasks = sorted((attrs(s) for _, s in ours if s.name in ("worker.generate", "worker.score")),
                          key=lambda a: a["trellis.run.tasks_done"])
    assert len(worker_tasks) == tasks >= 2
    assert len({a["trellis.run_id"] for a in worker_tasks}) == 1
    consumed = [a["trellis.run.tokens"] for a in worker_tasks]
    assert consumed[0] == 0 and consumed == sorted(consumed) and consumed[-1] > 0
