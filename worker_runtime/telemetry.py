"""What a worker reports about its tasks: spans and metrics.

Each task runs in a `worker.generate` / `worker.score` span, a child of the router's dispatch span. Its
phases (queue wait, prefill, decode) become child spans rebuilt from the engine's own timings when the
task finishes: the engine thread never touches OpenTelemetry, and with tracing off nothing is built.

Metrics (Prometheus names; the counters are ObservedCounters, cheap on this per-task path):
trellis_worker_time_to_first_token_seconds, _time_per_output_token_seconds,
_queue_duration_seconds histograms (end-to-end latency is the router's); _tasks_total by kind and status code;
_prompt_tokens_total, _cached_prompt_tokens_total, _completion_tokens_total; gauges for queue depth,
running sequences, KV blocks used and free, kept sequences and the prefix-cache hit ratio.
"""

from __future__ import annotations

import contextlib
import time
import uuid
import weakref
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import structlog
from opentelemetry import trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.trace import Span, Status, StatusCode

from trellis_rpc.telemetry import (
    LATENCY_BUCKETS_S,
    TOKEN_BUCKETS_S,
    ObservedCounter,
    configure_metrics,
    configure_tracing,
    meter,
    traced_parent,
    tracer,
)
from worker_runtime.engine_api import Finished, LoadStats, ScoreOut

log = structlog.get_logger(__name__)


def start_worker_telemetry(worker_id: str, metrics_port: int, metrics_host: str) -> str:
    """Every worker process's start: its id (worker_id, else a random one), tracing under it, and its Prometheus
    endpoint when metrics_port asks for one (logged). Returns the id."""
    worker_id = worker_id or f"worker-{uuid.uuid4().hex[:8]}"
    configure_tracing("worker", instance=worker_id)
    served = configure_metrics("worker", metrics_port, metrics_host, instance=worker_id)
    if served:
        log.info("metrics", url=f"http://{metrics_host}:{served}/metrics")
    return worker_id

_tracer = tracer("trellis.worker")
_meter = meter("trellis.worker")

_ttft = _meter.create_histogram("trellis.worker.time_to_first_token", unit="s",
                                description="submit to first sampled token, per generate task",
                                explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_S)
_tpot = _meter.create_histogram("trellis.worker.time_per_output_token", unit="s",
                                description="decode time per token after the first, per generate task",
                                explicit_bucket_boundaries_advisory=TOKEN_BUCKETS_S)
_queue = _meter.create_histogram("trellis.worker.queue.duration", unit="s",
                                 description="submit to first scheduled step (or scoring batch)",
                                 explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_S)
_tasks = ObservedCounter(_meter, "trellis.worker.tasks", ("kind", "code"),
                         description="tasks ended, by kind and status code")
_prompt_tokens = ObservedCounter(_meter, "trellis.worker.prompt_tokens", unit="{token}")
_cached_tokens = ObservedCounter(_meter, "trellis.worker.cached_prompt_tokens", unit="{token}",
                       description="prompt tokens whose KV came from the prefix cache")
_completion_tokens = ObservedCounter(_meter, "trellis.worker.completion_tokens", unit="{token}")

_workers: weakref.WeakSet[WorkerTelemetry] = weakref.WeakSet()


def _gauge(name: str, description: str, read: Callable[[WorkerTelemetry], float]) -> None:
    def observe(_options: CallbackOptions) -> Iterable[Observation]:
        for worker in list(_workers):
            value = worker.read(read)
            if value is not None:
                yield Observation(value, worker.attributes)

    _meter.create_observable_gauge(name, callbacks=[observe], description=description)


@dataclass
class _Totals:
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0


class WorkerTelemetry:
    """One per WorkerService. load: the service's current load (read at scrape time)."""

    def __init__(self, worker_id: str, load: Callable[[], LoadStats]) -> None:
        self.worker_id = worker_id
        self.load = load
        self.totals = _Totals()
        self.attributes = {"worker_id": worker_id}
        _workers.add(self)

    def read(self, field: Callable[[WorkerTelemetry], float]) -> float | None:
        try:
            return field(self)
        except Exception:  # not attached yet (model loading): nothing to report
            return None

    # ---- spans -------------------------------------------------------------------------------

    @staticmethod
    def task_span(name: str, task_id: str, carrier: dict[str, str], run=None) -> AbstractContextManager:
        """The task's span, current while it runs; its parent is the router's dispatch span (carrier). With the
        task's run (RunContext): what the scheduler ordered it by. The worker's id is the trace resource's
        service.instance.id."""
        parent = traced_parent(carrier)
        if parent is None:
            return contextlib.nullcontext()
        attributes = {"trellis.task_id": task_id}
        if run is not None and run.run_id:
            attributes |= {"trellis.run_id": run.run_id, "trellis.run.priority": run.priority,
                           "trellis.run.tokens": run.tokens, "trellis.run.tasks_done": run.tasks_done}
        return _tracer.start_as_current_span(name, context=parent, attributes=attributes)

    @staticmethod
    def _phase(parent: Span, name: str, start_ns: int, end_ns: int, attributes: dict | None = None) -> None:
        span = _tracer.start_span(name, context=trace.set_span_in_context(parent), start_time=start_ns,
                                  attributes=attributes)
        span.end(end_time=max(start_ns, end_ns))

    # ---- outcomes ----------------------------------------------------------------------------

    def generated(self, done: Finished) -> None:
        """A generate task finished: its phases as spans, its timings and tokens as metrics."""
        completion = sum(len(c.token_ids) for c in done.completions)
        longest = max((len(c.token_ids) for c in done.completions), default=0)
        span = trace.get_current_span()
        if span.is_recording():
            end = time.time_ns()
            submitted = end - int(done.latency_ms * 1e6)
            started = submitted + int(done.queue_ms * 1e6)
            first = submitted + int(done.ttft_ms * 1e6)
            # Each attribute costs ~5 us to export (OTLP encoding in Python): each count is said once.
            span.set_attribute("trellis.completion_tokens", completion)
            self._phase(span, "worker.queue", submitted, started)
            self._phase(span, "worker.prefill", started, first, {
                "trellis.prompt_tokens": done.prompt_tokens, "trellis.cached_prompt_tokens": done.cached_prompt_tokens,
                "trellis.batch_size": done.prefill_batch_size})
            if done.decode_steps:
                self._phase(span, "worker.decode", first, end, {
                    "trellis.steps": done.decode_steps, "trellis.batch_size_mean": round(done.decode_batch_mean, 2)})
        _ttft.record(done.ttft_ms / 1000)
        _queue.record(done.queue_ms / 1000, {"kind": "generate", **self.attributes})
        if longest > 1:
            # The n samples of a task decode in lockstep, so the longest spans every decode step.
            _tpot.record((done.latency_ms - done.ttft_ms) / 1000 / (longest - 1))
        _prompt_tokens.add(done.prompt_tokens)
        _cached_tokens.add(done.cached_prompt_tokens)
        _completion_tokens.add(completion)
        self.totals.prompt_tokens += done.prompt_tokens
        self.totals.cached_prompt_tokens += done.cached_prompt_tokens

    def scored(self, done: ScoreOut) -> None:
        span = trace.get_current_span()
        if span.is_recording():
            end = time.time_ns()
            submitted = end - int(done.latency_ms * 1e6)
            span.set_attributes({"trellis.candidates": len(done.scores), "trellis.prompt_tokens": done.prompt_tokens})
            self._phase(span, "worker.queue", submitted, submitted + int(done.queue_ms * 1e6))
        _queue.record(done.queue_ms / 1000, {"kind": "score", **self.attributes})
        _prompt_tokens.add(done.prompt_tokens)

    @staticmethod
    def ended(kind: str, code: str, message: str = "") -> None:
        """Every task ends here exactly once, with its gRPC status code name ("OK" when it succeeded)."""
        _tasks.add(1, kind, code)
        if code != "OK":
            span = trace.get_current_span()
            span.set_attribute("trellis.status_code", code)
            if code != "CANCELLED":  # a cancel is the caller's choice, not a failure
                span.set_status(Status(StatusCode.ERROR, f"{code}: {message}"))


_gauge("trellis.worker.queue_depth", "tasks waiting for their first step", lambda w: w.load().queue_depth)
_gauge("trellis.worker.waiting_runs", "distinct runs among the tasks waiting", lambda w: w.load().waiting_runs)
_gauge("trellis.worker.paused_sequences", "running sequences left out of the last step for better-ranked runs",
       lambda w: w.load().paused_sequences)
_gauge("trellis.worker.running_sequences", "sequences in the running batch", lambda w: w.load().running_sequences)
_gauge("trellis.worker.kv_blocks_used", "KV cache blocks in use", lambda w: w.load().kv_blocks_used)
_gauge("trellis.worker.kv_blocks_free", "KV cache blocks free", lambda w: w.load().kv_blocks_free)
_gauge("trellis.worker.kept_sequences", "finished sequences kept for continue/fork",
       lambda w: w.load().kept_sequences)
_gauge("trellis.worker.prefix_cache_hit_ratio", "cached / all prompt tokens since start",
       lambda w: w.totals.cached_prompt_tokens / w.totals.prompt_tokens if w.totals.prompt_tokens else 0.0)
