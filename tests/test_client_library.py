"""The Python client library (trellis_client) against a real router and worker on loopback: sync and async,
events in order, cancellation freeing the worker's KV, every error kind with its fields, retry with the hint."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import grpc
import pytest

from client.launcher import start_router
from tests.helpers import eventually
from tests.test_observability import scrape, total
from trellis_client import (
    AsyncClient,
    Client,
    Delta,
    Failed,
    Final,
    Intermediate,
    Progress,
    Retry,
    Sampling,
    Started,
    TrellisError,
)
from trellis_client.connection import Target

QUESTION = "What is 3 + 4?"
LONG = {"max_tokens": 400, "ignore_eos": True, "temperature": 1.0}
# the tiny model's text has no numbers: vote on its first character instead
VOTE = {"extractor": "regex", "pattern": r"(\S)"}


def worker_load(stack: dict) -> tuple[float, float]:
    samples = scrape(stack["worker_metrics"])
    return total(samples, "trellis_worker_kv_blocks_used"), total(samples, "trellis_worker_running_sequences")


def idle(stack: dict) -> bool:
    return worker_load(stack) == (0, 0)


def check_events(events: list, n: int) -> None:
    """Started first, Final last, time never goes back, each branch's deltas spell its candidate's text."""
    assert isinstance(events[0], Started) and isinstance(events[-1], Final)
    assert not any(isinstance(e, Final) for e in events[:-1])
    times = [e.elapsed_ms for e in events]
    assert times == sorted(times)
    assert {type(e) for e in events} >= {Started, Progress, Delta, Intermediate, Final}
    result = events[-1].result
    assert len(result.candidates) == n
    texts: dict[str, str] = {}
    for e in events:
        if isinstance(e, Delta):
            texts[e.branch] = texts.get(e.branch, "") + e.text
    for c in result.candidates:
        assert texts.get(c.branch, "") == c.text


def test_sync_run_and_stream(client_stack):
    with Client(client_stack["router"].address) as client:
        result = client.run("majority_vote", QUESTION, params={"n": 3, **VOTE}, sampling=Sampling(max_tokens=6, seed=1))
        assert result.controller == "majority_vote" and len(result.candidates) == 3
        assert sum(result.details["votes"].values()) == 3 and result.usage.completion_tokens >= 3
        assert result.usage.tasks >= 1 and result.timings.total_ms > 0
        assert all(c.finish_reason in ("stop", "length") for c in result.candidates)
        events = list(client.stream("majority_vote", QUESTION, params={"n": 3, **VOTE},
                                    sampling={"max_tokens": 6, "seed": 1}))
        check_events(events, 3)
        # same seed, same request: the streamed run chose what the unary one did
        assert events[-1].result.text == result.text and events[0].params["n"] == 3


def test_async_run_and_stream(client_stack):
    async def main():
        async with AsyncClient(client_stack["router"].address) as client:
            result = await client.run("native_generation", [{"role": "user", "content": QUESTION}],
                                      sampling={"max_tokens": 5, "seed": 3})
            events = [e async for e in client.stream("majority_vote", QUESTION, params={"n": 2, **VOTE},
                                                     sampling={"max_tokens": 5, "seed": 3})]
            catalog = await client.catalog()
            return result, events, catalog

    result, events, catalog = asyncio.run(main())
    assert result.usage.completion_tokens >= 1 and result.candidates[0].text == result.text
    check_events(events, 2)
    assert {"native_generation", "majority_vote", "mcts"} <= {c.name for c in catalog.controllers}
    assert catalog.models and catalog.controller("majority_vote").params


def test_generate_score_and_controllers(client_stack):
    with Client(client_stack["router"].address) as client:
        generation = client.generate("Once upon a time", raw=True, sampling={"max_tokens": 4, "n": 2, "seed": 5,
                                                                           "logprobs": 2})
        assert [c.index for c in generation.completions] == [0, 1]
        assert all(len(c.token_ids) == len(c.logprobs) >= 1 for c in generation.completions)
        assert generation.completions[0].logprobs[0].top and generation.worker_id
        scores = client.score(QUESTION, ["7", "8"], kind="verifier")
        assert [s.index for s in scores.scores] == [0, 1] and all(0 <= s.score <= 1 for s in scores.scores)
        info = {c.name: c for c in client.controllers()}
        n = next(p for p in info["majority_vote"].params if p.name == "n")
        assert n.type == "int" and isinstance(n.default, int) and n.maximum == 16


def test_breaking_out_of_a_stream_cancels_the_run_and_frees_the_workers_kv(client_stack):
    with Client(client_stack["router"].address) as client:
        deltas = 0
        for event in client.stream("majority_vote", QUESTION, params={"n": 4}, sampling=LONG):
            deltas += isinstance(event, Delta)
            if deltas == 8:
                assert worker_load(client_stack)[0] > 0     # the four samples hold KV blocks now
                break
        eventually(lambda: idle(client_stack), timeout_s=5)
        assert idle(client_stack)


def test_cancelling_the_async_task_cancels_the_run(client_stack):
    async def main():
        async with AsyncClient(client_stack["router"].address) as client:
            started = asyncio.Event()

            async def consume():
                async for event in client.stream("majority_vote", QUESTION, params={"n": 4}, sampling=LONG):
                    if isinstance(event, Delta):
                        started.set()

            task = asyncio.create_task(consume())
            await asyncio.wait_for(started.wait(), 30)
            busy = worker_load(client_stack)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return busy

    busy = asyncio.run(main())
    assert busy[0] > 0
    eventually(lambda: idle(client_stack), timeout_s=5)
    assert idle(client_stack)


def test_errors_carry_code_field_and_reason(client_stack):
    with Client(client_stack["router"].address) as client:
        with pytest.raises(TrellisError) as info:
            client.run("majority_vote", QUESTION, params={"n": "eight"})
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and info.value.field == "params.n"
        assert not info.value.retryable

        with pytest.raises(TrellisError) as info:
            list(client.stream("no_such_controller", QUESTION))
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and info.value.field == "controller"

        with pytest.raises(TrellisError) as info:   # longer than the tiny model's context
            client.run("native_generation", "word " * 3000, raw=True, sampling={"max_tokens": 4})
        assert info.value.field == "prompt" and info.value.reason == "CONTEXT_LENGTH_EXCEEDED"

        with pytest.raises(TrellisError) as info:
            client.run("native_generation", QUESTION, sampling=LONG, deadline=0.2)
        assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED

        with pytest.raises(ValueError, match="sampling.max_token"):
            client.run("native_generation", QUESTION, sampling={"max_token": 4})


def test_unauthenticated_and_permission_denied(client_stack, logs, tmp_path):
    import hashlib

    auth = tmp_path / "auth.json"
    auth.write_text(json.dumps({"clients": [{"name": "voter", "token_sha256": hashlib.sha256(b"s3cret").hexdigest(),
                                             "controllers": ["majority_vote"]}]}))
    router = start_router([client_stack["worker"].address], logs, name="auth-router",
                          extra=["--auth-file", str(auth)])
    try:
        router.wait_serving(timeout=60)
        with Client(router.address, token="nope") as stranger:
            with pytest.raises(TrellisError) as info:
                stranger.run("majority_vote", QUESTION)
            assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
        with Client(router.address, token="s3cret") as voter:
            assert [c.name for c in voter.controllers()] == ["majority_vote"]
            with pytest.raises(TrellisError) as info:
                voter.run("mcts", QUESTION)
            assert info.value.code == grpc.StatusCode.PERMISSION_DENIED and info.value.field == "controller"
            # a per-call token wins over the client's
            with pytest.raises(TrellisError) as info:
                voter.controllers(token="wrong")
            assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
    finally:
        router.stop()


class RecordingRetry(Retry):
    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        object.__setattr__(self, "log", [])

    def wait(self, err, attempt):
        chosen = super().wait(err, attempt)
        self.log.append((err.code, err.retry_after, chosen))
        return chosen


@pytest.fixture(scope="module")
def full_router(client_stack, logs):
    """Room for one running run and none waiting: a second run at the same time is RESOURCE_EXHAUSTED."""
    router = start_router([client_stack["worker"].address], logs, name="full-router",
                          extra=["--max-running-runs", "1", "--max-queued-runs", "0"])
    try:
        router.wait_serving(timeout=60)
        yield router
    finally:
        router.stop()


def occupy(address: str, seconds_of_tokens: int = 150) -> tuple[threading.Thread, threading.Event]:
    """A run that holds the router's one slot until it ends; `started` is set once it streams."""
    started = threading.Event()

    def hold():
        with Client(address) as c:
            for event in c.stream("native_generation", QUESTION,
                                  sampling={"max_tokens": seconds_of_tokens, "ignore_eos": True}):
                if isinstance(event, Started):
                    started.set()

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    assert started.wait(30)
    return thread, started


def test_full_router_is_resource_exhausted_with_retry_after(full_router):
    thread, _ = occupy(full_router.address)
    with Client(full_router.address) as client:
        with pytest.raises(TrellisError) as info:
            client.run("native_generation", QUESTION, sampling={"max_tokens": 2})
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and info.value.retryable
    assert info.value.retry_after is not None and info.value.retry_after >= 0.1
    thread.join(60)


@pytest.mark.parametrize("kind", ["run", "stream", "async_stream"])
def test_retry_waits_as_long_as_the_router_says_then_succeeds(full_router, kind):
    thread, _ = occupy(full_router.address)
    retry = RecordingRetry(attempts=100, max_wait=5.0)
    started = time.monotonic()
    sampling = {"max_tokens": 2}
    if kind == "run":
        with Client(full_router.address, retry=retry) as client:
            result = client.run("native_generation", QUESTION, sampling=sampling)
    elif kind == "stream":
        with Client(full_router.address, retry=retry) as client:
            result = client.stream("native_generation", QUESTION, sampling=sampling).result()
    else:
        async def main():
            async with AsyncClient(full_router.address, retry=retry) as client:
                return await client.stream("native_generation", QUESTION, sampling=sampling).result()
        result = asyncio.run(main())
    waited = time.monotonic() - started
    thread.join(60)
    assert result.usage.completion_tokens >= 1
    assert retry.log, "the first call should have been refused while the slot was held"
    for code, hint, chosen in retry.log:
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and hint is not None and chosen == min(5.0, hint)
    assert waited >= sum(chosen for *_, chosen in retry.log) * 0.9


def test_no_retry_after_events_have_arrived():
    """A stream that failed mid-way is not retried: the caller has seen its events already."""
    from trellis_client.sync_client import EventStream

    class Broken(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.UNAVAILABLE

        def details(self):
            return "worker gone"

        def trailing_metadata(self):
            return ()

    from trellis_rpc.v1 import router_pb2

    calls = []

    def start():
        calls.append(1)

        def gen():
            yield router_pb2.RunEvent(run_id="r", started=router_pb2.RunStarted(controller="x"))
            raise Broken()

        class Call:
            def __init__(self):
                self.it = gen()

            def __next__(self):
                return next(self.it)

            def cancel(self):
                pass

        return Call()

    stream = EventStream(start, Retry(attempts=5, backoff=0))
    assert isinstance(next(stream), Started)
    with pytest.raises(TrellisError, match="worker gone"):
        next(stream)
    assert len(calls) == 1


def test_sessions_sync_and_async(client_stack):
    address = client_stack["router"].address
    with Client(address) as client, client.session() as session:
        a = session.submit("native_generation", QUESTION, sampling={"max_tokens": 4, "seed": 1})
        b = session.submit("majority_vote", QUESTION, params={"n": 2}, sampling={"max_tokens": 4})
        bad = session.submit("nope", QUESTION)
        long = session.submit("native_generation", QUESTION, sampling=LONG)
        long.cancel()
        assert a.result(60).usage.completion_tokens >= 1 and len(b.result(60).candidates) == 2
        with pytest.raises(TrellisError) as info:
            bad.result(60)
        assert info.value.field == "run.controller"
        with pytest.raises(TrellisError) as info:
            long.result(60)
        assert info.value.code == grpc.StatusCode.CANCELLED
        kinds = [type(e) for e in b.events()]
        assert kinds[0] is Started and kinds[-1] is Final

    async def main():
        async with AsyncClient(address) as client, client.session() as session:
            handles = [await session.submit("native_generation", QUESTION, sampling={"max_tokens": 3, "seed": i})
                       for i in range(3)]
            bad = await session.submit("majority_vote", QUESTION, params={"n": -1})
            results = [await h.result() for h in handles]
            events = [e async for e in bad.events()]
            return results, events

    results, events = asyncio.run(main())
    assert len(results) == 3 and isinstance(events[-1], Failed) and events[-1].error.field == "run.params.n"
    eventually(lambda: idle(client_stack), timeout_s=5)


def test_calls_carry_the_callers_trace_context():
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("caller") as span:
        metadata = dict(Target.of("127.0.0.1:1", None, "tok").metadata())
        ids = span.get_span_context()
    assert metadata["authorization"] == "Bearer tok"
    assert metadata["traceparent"].split("-")[1:3] == [format(ids.trace_id, "032x"), format(ids.span_id, "016x")]
    assert "traceparent" not in dict(Target.of("127.0.0.1:1", None, "").metadata())
    assert trace.get_current_span().get_span_context().is_valid is False
