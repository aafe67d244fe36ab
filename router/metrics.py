"""The router's metrics (OpenTelemetry instruments, scraped through trellis_rpc.telemetry's endpoint).

Prometheus names: trellis_router_run_duration_seconds and _run_time_to_first_token_seconds histograms
(by controller); trellis_router_runs_total by controller and gRPC status code; _tasks_total by kind and
code; _prompt_tokens_total and _completion_tokens_total; _routing_decisions_total by policy and
whether the chosen worker held part of the prompt; _migrations_total; gauges for runs running and
queued, and workers by state. Recording is cheap and happens per run or task, never per token.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable

from opentelemetry.metrics import CallbackOptions, Observation

from trellis_rpc.telemetry import LATENCY_BUCKETS_S, ObservedCounter, meter

_meter = meter("trellis.router")

run_duration = _meter.create_histogram("trellis.router.run.duration", unit="s",
                                       description="accepted to result, per run",
                                       explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_S)
run_ttft = _meter.create_histogram("trellis.router.run.time_to_first_token", unit="s",
                                   description="accepted to the first token of any branch, per run",
                                   explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_S)
runs = ObservedCounter(_meter, "trellis.router.runs", ("controller", "code"),
                       description="runs ended (or refused), by controller and gRPC status code")
tasks = ObservedCounter(_meter, "trellis.router.tasks", ("kind", "code"),
                        description="worker tasks ended, by kind and gRPC status code")
prompt_tokens = ObservedCounter(_meter, "trellis.router.prompt_tokens", unit="{token}")
completion_tokens = ObservedCounter(_meter, "trellis.router.completion_tokens", unit="{token}")
routing_decisions = ObservedCounter(
    _meter, "trellis.router.routing.decisions", ("policy", "prefix_hit"),
    description="workers picked, by policy (kv-balance: the kv policy fell back to load; run: the run's last worker) "
                "and prefix_hit")
migrations = ObservedCounter(_meter, "trellis.router.migrations",
                             description="unfinished samples resumed on another worker")

_sources: list[weakref.ref] = []


def observe(name: str, description: str, read: Callable[[object], Iterable[tuple[float, dict]]]) -> None:
    """A gauge read at scrape time from every live object registered with watch()."""
    def callback(_options: CallbackOptions) -> Iterable[Observation]:
        for ref in list(_sources):
            source = ref()
            if source is None:
                _sources.remove(ref)
                continue
            for value, attributes in read(source):
                yield Observation(value, attributes)

    _meter.create_observable_gauge(name, callbacks=[callback], description=description)


def watch(service: object) -> None:
    """Report the gauges of a RouterService (its admission state and its pool's workers)."""
    _sources.append(weakref.ref(service))


def _workers_by_state(service) -> Iterable[tuple[float, dict]]:
    counts = {"ready": 0, "ejected": 0, "unreachable": 0}
    for w in service.pool.workers:
        state = "ejected" if w.breaker.open else "ready" if w.routable else "unreachable"
        counts[state] += 1
    return [(n, {"state": state}) for state, n in counts.items()]


observe("trellis.router.runs.running", "runs admitted and running", lambda s: [(s.admission.running, {})])
observe("trellis.router.runs.queued", "runs waiting for admission", lambda s: [(s.admission.queued, {})])
observe("trellis.router.workers", "worker links by state", _workers_by_state)
