"""End to end through real router and worker processes (tiny random Llama), via the generated stubs."""

from __future__ import annotations

import queue
import threading
from collections import Counter

import grpc
import pytest
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.helpers import chat, run_request
from trellis_rpc.v1 import common_pb2, router_pb2


def test_native_generation_run(router):
    result = router.Run(run_request("native_generation", max_tokens=12, seed=1), timeout=60)
    assert result.controller == "native_generation"
    assert result.run_id
    assert len(result.candidates) == 1
    assert result.answer == result.text == result.candidates[0].text
    assert 1 <= result.usage.completion_tokens <= 12
    assert result.usage.prompt_tokens > 0 and result.usage.tasks == 1
    assert result.timings.total_ms >= result.timings.ttft_ms > 0


def test_run_stream_deltas_add_up_to_the_result(router):
    events = list(router.RunStream(run_request("native_generation", max_tokens=16, seed=3), timeout=60))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "started" and kinds[-1] == "result"
    deltas = [e.delta for e in events if e.WhichOneof("event") == "delta"]
    assert deltas, "tokens must stream before the result"
    assert {d.branch for d in deltas} == {"sample/0"}
    result = events[-1].result
    assert "".join(d.text for d in deltas) == result.text
    assert sum(d.token_count for d in deltas) == result.usage.completion_tokens
    elapsed = [e.elapsed_ms for e in events]
    assert elapsed == sorted(elapsed)


def test_majority_vote_streams_branches_and_counts_votes(router):
    events = list(router.RunStream(run_request("majority_vote", params={"n": 6, "extractor": "regex",
                                                                         "pattern": r"(\w)"},
                                               max_tokens=6, seed=11), timeout=120))
    result = events[-1].result
    assert len(result.candidates) == 6
    branches = {e.delta.branch for e in events if e.WhichOneof("event") == "delta"}
    assert branches == {f"sample/{i}" for i in range(6)}
    # The tally is exactly the extracted answers of the candidates, and the winner has the most votes.
    expected = Counter(c.answer for c in result.candidates if c.answer)
    votes = {k: int(v) for k, v in json_format.MessageToDict(result.details)["votes"].items()}
    assert votes == dict(expected)
    if expected:
        assert votes[result.answer] == max(expected.values())
    vote_events = [e.intermediate for e in events if e.WhichOneof("event") == "intermediate"]
    assert len(vote_events) == sum(expected.values())
    token_deltas = sum(e.delta.token_count for e in events if e.WhichOneof("event") == "delta")
    assert result.usage.completion_tokens == token_deltas > 0
    assert result.usage.tasks == 1, "n samples of one prompt go to the worker as one task (one prefill)"


def test_list_controllers(router):
    reply = router.ListControllers(router_pb2.ListControllersRequest(), timeout=10)
    by_name = {c.name: c for c in reply.controllers}
    assert {"native_generation", "majority_vote"} <= set(by_name)
    params = {p.name: p for p in by_name["majority_vote"].params}
    assert params["n"].type == "int" and params["n"].minimum == 1 and params["n"].maximum == 16
    assert json_format.MessageToDict(params["extractor"].default) == "auto"
    assert all(p.description for p in params.values())


def _generate(router, **sampling):
    req = router_pb2.GenerateRequest(prompt=chat("Count: 1 2 3"), sampling=common_pb2.SamplingParams(**sampling))
    return router.Generate(req, timeout=60)


def test_generate_passthrough_seed_is_reproducible(router):
    a = _generate(router, max_tokens=10, seed=1234, temperature=1.0, n=3)
    b = _generate(router, max_tokens=10, seed=1234, temperature=1.0, n=3)
    assert [c.token_ids for c in a.completions] == [c.token_ids for c in b.completions]
    assert len(a.completions) == 3
    assert len({tuple(c.token_ids) for c in a.completions}) > 1, "n samples must differ"


def test_generate_greedy_is_deterministic_and_length_capped(router):
    a = _generate(router, max_tokens=7, temperature=0.0, ignore_eos=True)
    b = _generate(router, max_tokens=7, temperature=0.0, ignore_eos=True)
    assert a.completions[0].token_ids == b.completions[0].token_ids
    assert len(a.completions[0].token_ids) == 7
    assert a.completions[0].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert a.usage.completion_tokens == 7


def test_generate_logprobs(router):
    r = _generate(router, max_tokens=5, seed=5, logprobs=3, ignore_eos=True)
    c = r.completions[0]
    assert len(c.logprobs) == len(c.token_ids) == 5
    for token_id, lp in zip(c.token_ids, c.logprobs, strict=True):
        assert lp.token_id == token_id and lp.logprob <= 0
        assert len(lp.top) == 3
        assert [t.logprob for t in lp.top] == sorted((t.logprob for t in lp.top), reverse=True)
        assert lp.logprob <= lp.top[0].logprob + 1e-5
    assert c.cumulative_logprob == pytest.approx(sum(lp.logprob for lp in c.logprobs), rel=1e-4)


def test_generate_stop_string_is_cut_and_reported(router):
    free = _generate(router, max_tokens=24, temperature=0.0, ignore_eos=True).completions[0]
    assert len(free.text) >= 4
    stop = free.text[2:4]
    cut = _generate(router, max_tokens=24, temperature=0.0, ignore_eos=True, stop=[stop]).completions[0]
    assert cut.finish_reason == common_pb2.FINISH_REASON_STOP
    assert cut.stop_reason == stop
    assert cut.text == free.text[:free.text.index(stop)]
    assert stop not in cut.text


def test_generate_stop_token_id_and_min_tokens(router):
    free = _generate(router, max_tokens=12, temperature=0.0, ignore_eos=True).completions[0]
    free_ids = list(free.token_ids)
    target = free_ids[3]
    first = free_ids.index(target)
    cut = _generate(router, max_tokens=12, temperature=0.0, ignore_eos=True, stop_token_ids=[target]).completions[0]
    assert list(cut.token_ids) == free_ids[:first + 1]
    assert cut.finish_reason == common_pb2.FINISH_REASON_STOP
    # min_tokens masks the stop token until that many tokens exist.
    held = _generate(router, max_tokens=12, temperature=0.0, ignore_eos=True, stop_token_ids=[target],
                     min_tokens=first + 2).completions[0]
    assert len(held.token_ids) >= first + 2
    assert target not in held.token_ids[:first + 2]


def test_penalties_change_greedy_output(router):
    base = _generate(router, max_tokens=20, temperature=0.0, ignore_eos=True).completions[0]
    rep = _generate(router, max_tokens=20, temperature=0.0, ignore_eos=True, repetition_penalty=5.0).completions[0]
    freq = _generate(router, max_tokens=20, temperature=0.0, ignore_eos=True, frequency_penalty=2.0,
                     presence_penalty=2.0).completions[0]
    repeats = lambda ids: len(ids) - len(set(ids))  # noqa: E731
    assert repeats(rep.token_ids) <= repeats(base.token_ids)
    assert repeats(freq.token_ids) <= repeats(base.token_ids)
    assert rep.token_ids != base.token_ids or repeats(base.token_ids) == 0


def test_session_pipelines_runs_and_cancels_one(router):
    requests: queue.Queue = queue.Queue()

    def outgoing():
        while (item := requests.get()) is not None:
            yield item

    requests.put(router_pb2.SessionRequest(run=run_request("native_generation", run_id="a", max_tokens=4, seed=1)))
    requests.put(router_pb2.SessionRequest(run=run_request("majority_vote", run_id="b", params={"n": 3},
                                                           max_tokens=4, seed=2)))
    requests.put(router_pb2.SessionRequest(run=run_request("native_generation", run_id="long", max_tokens=200,
                                                           ignore_eos=True, seed=3)))
    requests.put(router_pb2.SessionRequest(run=run_request("nope", run_id="bad")))
    results, errors = {}, {}
    done = threading.Event()
    for event in router.Session(outgoing(), timeout=120):
        kind = event.WhichOneof("event")
        if kind == "started" and event.run_id == "long":
            requests.put(router_pb2.SessionRequest(cancel=router_pb2.CancelRun(run_id="long")))
        elif kind == "result":
            results[event.run_id] = event.result
        elif kind == "error":
            errors[event.run_id] = event.error
        if set(results) | set(errors) >= {"a", "b", "long", "bad"} and not done.is_set():
            done.set()
            requests.put(None)
    assert set(results) == {"a", "b"}
    assert results["b"].controller == "majority_vote" and len(results["b"].candidates) == 3
    assert errors["long"].code == grpc.StatusCode.CANCELLED.value[0]
    assert errors["bad"].code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert errors["bad"].field == "run.controller"


def test_health_and_reflection(tiny_router, tiny_worker):
    for proc, service in ((tiny_router, "trellis.v1.Router"), (tiny_worker, "trellis.v1.Worker")):
        with grpc.insecure_channel(proc.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert status.status == health_pb2.HealthCheckResponse.SERVING
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                timeout=5)
            names = {s.name for r in replies for s in r.list_services_response.service}
            assert service in names and "grpc.health.v1.Health" in names
