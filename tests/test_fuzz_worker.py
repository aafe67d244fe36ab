"""Bad input on the worker contract itself, property-based: a worker is a service in its own right (the router
validates first, but anything holding a certificate the worker trusts can open a Connect stream).

Each example opens a Connect stream to a real tiny-model worker process and sends a few WorkerRequests built
from every field's full range: generate tasks (any prompt, any sampling, continue/fork of real, foreign or
made-up handles, keep with any TTL, any timeout), score tasks (any kind, candidates, separator), cancels of
tasks sent, unsent or never named, releases, requests with no kind, and reused task ids. For each:
- every task ends, within the deadline, in a result or an error whose code is one the contract allows
  (never UNKNOWN or INTERNAL); an INVALID_ARGUMENT names a field and its message starts with it;
- the stream stays open (no RPC error), and afterwards the worker serves a plain task and holds no KV.
"""

from __future__ import annotations

import itertools
import time

import grpc
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from client.launcher import start_worker
from tests.helpers import chat
from tests.test_fuzz import int32s, prompts, samplings, texts, valid_samplings
from tests.test_worker_stream import Stream
from trellis_rpc.v1 import common_pb2, worker_pb2, worker_pb2_grpc

# Starts workers and routers: the slower half of the suite.
pytestmark = pytest.mark.processes

DEADLINE_S = 30.0
ALLOWED = {
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.NOT_FOUND, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED, grpc.StatusCode.ALREADY_EXISTS,
}
ENDS = ("generate_result", "score_result", "error")
FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
WORKER_ID = "fuzzed"
_ids = itertools.count()
CODES = {code.value[0]: code for code in grpc.StatusCode}


@pytest.fixture(scope="module")
def worker(tiny_model, logs):
    proc = start_worker(str(tiny_model), logs, name="fuzzed-worker",
                        extra=["--threads", "1", "--worker-id", WORKER_ID, "--max-n", "8"])
    try:
        proc.wait_serving(timeout=120)
        with grpc.insecure_channel(proc.address) as channel:
            yield worker_pb2_grpc.WorkerStub(channel)
    finally:
        proc.stop()


def read_until(stream: Stream, matches, deadline: float) -> list[worker_pb2.WorkerResponse]:
    """Responses up to the first that matches; fails past the deadline or if the worker ends the stream."""
    seen = stream.until(matches, deadline=deadline)
    assert seen and matches(seen[-1]), "the worker closed the stream"
    return seen


# ---- strategies ------------------------------------------------------------------------------------------

int64s = st.integers(-(2**63), 2**63 - 1)
timeouts = st.one_of(st.just(0), st.just(0), st.integers(1, 50), st.sampled_from([-1, -(2**63), 2**63 - 1]))
handles = st.one_of(texts, st.sampled_from([f"{WORKER_ID}:", f"{WORKER_ID}:nope/0", "other:x/0", ":", ""]),
                    st.just("KEPT"))   # KEPT: the handle a generate task of this example kept, if any


@st.composite
def generate_tasks(draw) -> worker_pb2.GenerateTask:
    """A task that would run, with nothing, one part or every part drawn from its full range."""
    broken = draw(st.sampled_from(["none", "none", "prompt", "sampling", "source", "keep", "everything"]))
    task = worker_pb2.GenerateTask(
        prompt=draw(prompts) if broken in ("prompt", "everything") else chat(draw(texts.filter(str.strip))),
        sampling=draw(samplings(max_n=4) if broken in ("sampling", "everything") else valid_samplings(max_n=4)),
        stream=draw(st.booleans()), branch=draw(texts))
    if broken in ("source", "everything") or draw(st.booleans()):
        source = draw(st.sampled_from(["continue_from", "fork_from"]))
        getattr(task, source).handle = draw(handles) if broken in ("source", "everything") else "KEPT"
        if not broken == "prompt":   # appended to a kept sequence: text or token ids, not a chat
            task.prompt.CopyFrom(common_pb2.Prompt(text=draw(texts)))
    if broken in ("keep", "everything") or draw(st.booleans()):
        task.keep.keep = True
        task.keep.ttl_ms = draw(int64s) if broken in ("keep", "everything") else draw(st.integers(1, 60_000))
    return task


@st.composite
def score_tasks(draw) -> worker_pb2.ScoreTask:
    """A verifier task that would run (the tiny worker serves that kind), or one with any part drawn from its
    full range."""
    broken = draw(st.sampled_from(["none", "none", "prompt", "candidates", "kind", "everything"]))
    request = common_pb2.ScoreRequest(
        prompt=draw(prompts) if broken in ("prompt", "everything") else chat("What is 3 + 4?"),
        candidates=draw(st.lists(st.one_of(texts, st.just("word " * 300)), max_size=5)
                        if broken in ("candidates", "everything") else st.lists(texts.filter(str.strip), min_size=1,
                                                                                max_size=3)),
        kind=draw(st.one_of(st.sampled_from([common_pb2.SCORE_KIND_OUTCOME, common_pb2.SCORE_KIND_PROCESS,
                                             common_pb2.SCORE_KIND_UNSPECIFIED]), int32s)
                  if broken in ("kind", "everything") else st.just(common_pb2.SCORE_KIND_VERIFIER)),
        step_separator=draw(st.sampled_from(["", "\n\n", "x" * 100])), model=draw(st.sampled_from(["", "other"])))
    return worker_pb2.ScoreTask(request=request)


@st.composite
def requests(draw) -> list[worker_pb2.WorkerRequest]:
    """A few requests for one stream; task ids unique to the example unless it reuses one on purpose."""
    prefix = f"fz{next(_ids)}"
    out: list[worker_pb2.WorkerRequest] = []
    for i, kind in enumerate(draw(st.lists(st.sampled_from(
            ["generate", "generate", "generate", "score", "cancel", "release", "none", "reuse"]),
            min_size=1, max_size=4))):
        req = worker_pb2.WorkerRequest(task_id=f"{prefix}/{i}", timeout_ms=draw(timeouts))
        if kind in ("generate", "reuse"):
            req.generate.CopyFrom(draw(generate_tasks()))
            if kind == "reuse" and out:
                req.task_id = out[-1].task_id
        elif kind == "score":
            req.score.CopyFrom(draw(score_tasks()))
        elif kind == "cancel":
            req.cancel.target_task_id = draw(st.sampled_from([f"{prefix}/{j}" for j in range(i)] + ["", "never"]))
        elif kind == "release":
            req.release.task_prefix = draw(st.sampled_from([prefix, "", "fz", "never"]))
        out.append(req)
    return out


def needs_an_end(req: worker_pb2.WorkerRequest) -> bool:
    return req.WhichOneof("kind") in ("generate", "score", None)


# ---- the properties --------------------------------------------------------------------------------------

@FUZZ
@given(batch=requests())
def test_any_worker_request(worker, batch):
    stream = Stream(worker, timeout=DEADLINE_S * 2)
    deadline = time.monotonic() + DEADLINE_S
    try:
        kept = ""
        ends: dict[str, int] = {}
        expected: dict[str, int] = {}
        for req in batch:
            for source in ("continue_from", "fork_from"):
                if req.WhichOneof("kind") == "generate" and req.generate.WhichOneof("source") == source \
                        and getattr(req.generate, source).handle == "KEPT":
                    getattr(req.generate, source).handle = kept or f"{WORKER_ID}:gone/0"
            stream.send(req)
            if needs_an_end(req):
                expected[req.task_id] = expected.get(req.task_id, 0) + 1
                # One at a time: a later task may continue what this one kept.
                seen = read_until(stream, lambda r, tid=req.task_id: r.task_id == tid and r.WhichOneof("kind") in ENDS,
                                  deadline)
                for response in seen:
                    kind = response.WhichOneof("kind")
                    if kind in ENDS:
                        ends[response.task_id] = ends.get(response.task_id, 0) + 1
                        event(kind if kind != "error" else CODES.get(response.error.code, grpc.StatusCode.UNKNOWN).name)
                    if kind == "generate_result" and response.generate_result.sequence_handles:
                        kept = response.generate_result.sequence_handles[0] or kept
                    if kind == "error":
                        check_error(response.error, req)
        assert ends == expected, (ends, expected)
    finally:
        stream.close()


def check_error(error: worker_pb2.TaskError, req: worker_pb2.WorkerRequest) -> None:
    code = CODES.get(error.code, grpc.StatusCode.UNKNOWN)
    assert code in ALLOWED, f"{code.name}: {error.message!r} for {str(req)[:600]}"
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        assert error.field, f"INVALID_ARGUMENT names no field: {error.message!r}"
        assert error.message.startswith(error.field), f"{error.field!r} not first in {error.message!r}"


def test_the_worker_still_serves_and_holds_nothing(worker):
    """Runs after the fuzzing (file order): a plain task works, and once the kept sequences the fuzzing left
    are released, no KV block is in use."""
    stream = Stream(worker, timeout=DEADLINE_S * 2)
    deadline = time.monotonic() + DEADLINE_S
    try:
        stream.send(worker_pb2.WorkerRequest(task_id="after", generate=worker_pb2.GenerateTask(
            prompt=chat("hello"), sampling=common_pb2.SamplingParams(max_tokens=3, ignore_eos=True))))
        seen = read_until(stream, lambda r: r.task_id == "after" and r.WhichOneof("kind") in ENDS, deadline)
        assert len(seen[-1].generate_result.completions[0].token_ids) == 3
        stream.send(worker_pb2.WorkerRequest(release=worker_pb2.ReleaseSequences(task_prefix="fz")))
        for prefix in {f"fz{i}" for i in range(next(_ids))}:
            stream.send(worker_pb2.WorkerRequest(release=worker_pb2.ReleaseSequences(task_prefix=prefix)))
        idle = read_until(stream, lambda r: r.WhichOneof("kind") == "load" and r.load.kv_blocks_used == 0
                          and r.load.running_sequences == 0, deadline)
        assert idle[-1].load.kept_sequences == 0
    finally:
        stream.close()
