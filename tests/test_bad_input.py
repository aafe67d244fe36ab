"""Bad input gets INVALID_ARGUMENT naming the field, no worker gets UNAVAILABLE within the deadline,
and the processes keep serving after each."""

from __future__ import annotations

import time

import grpc
import pytest

from client.launcher import free_port, start_router
from tests.helpers import chat, run_request
from trellis_rpc.v1 import common_pb2, router_pb2, router_pb2_grpc


def _assert_still_serving(router) -> None:
    result = router.Run(run_request("native_generation", max_tokens=2, seed=0), timeout=30)
    assert result.usage.completion_tokens >= 1


CASES = {
    "unknown controller": (run_request("no_such_method"), "controller"),
    "missing controller": (run_request(""), "controller"),
    "empty prompt text": (run_request(prompt=common_pb2.Prompt(text="   ")), "prompt.text"),
    "no prompt": (router_pb2.RunRequest(controller="native_generation"), "prompt"),
    "empty chat": (run_request(prompt=common_pb2.Prompt(chat=common_pb2.ChatMessages())), "prompt.chat.messages"),
    "negative max_tokens": (run_request(max_tokens=-5), "sampling.max_tokens"),
    "zero max_tokens": (run_request(max_tokens=0), "sampling.max_tokens"),
    "negative temperature": (run_request(temperature=-0.1), "sampling.temperature"),
    "nan temperature": (run_request(temperature=float("nan")), "sampling.temperature"),
    "top_p zero": (run_request(top_p=0.0), "sampling.top_p"),
    "min_p above one": (run_request(min_p=1.5), "sampling.min_p"),
    "logprobs too many": (run_request(logprobs=100), "sampling.logprobs"),
    "min_tokens above max": (run_request(max_tokens=4, min_tokens=9), "sampling.min_tokens"),
    "empty stop string": (run_request(stop=[""]), "sampling.stop[0]"),
    "run sampling.n": (run_request(n=4), "sampling.n"),
    "n zero": (run_request("majority_vote", params={"n": 0}), "params.n"),
    "n above the cap": (run_request("majority_vote", params={"n": 17}), "params.n"),
    "n not an integer": (run_request("majority_vote", params={"n": 2.5}), "params.n"),
    "n a string": (run_request("majority_vote", params={"n": "eight"}), "params.n"),
    "unknown parameter": (run_request("majority_vote", params={"beams": 3}), "params.beams"),
    "unknown extractor": (run_request("majority_vote", params={"extractor": "vibes"}), "params.extractor"),
    "bad regex": (run_request("majority_vote", params={"extractor": "regex", "pattern": "("}), "params.pattern"),
    "prompt longer than the context": (run_request(prompt=common_pb2.Prompt(text="word " * 400)), "prompt"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_run_rejects_bad_input(router, name):
    request, field = CASES[name]
    for call in (router.Run, lambda r, timeout: list(router.RunStream(r, timeout=timeout))):
        with pytest.raises(grpc.RpcError) as info:
            call(request, timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        assert info.value.details().startswith(f"{field}:"), info.value.details()
    _assert_still_serving(router)


@pytest.mark.parametrize("sampling,field", [
    ({"n": 0}, "sampling.n"),
    ({"n": 17}, "sampling.n"),
    ({"max_tokens": -1}, "sampling.max_tokens"),
    ({"temperature": -1.0}, "sampling.temperature"),
    ({"top_k": -3}, "sampling.top_k"),
    ({"repetition_penalty": 0.0}, "sampling.repetition_penalty"),
    ({"frequency_penalty": 3.0}, "sampling.frequency_penalty"),
])
def test_generate_rejects_bad_sampling(router, sampling, field):
    req = router_pb2.GenerateRequest(prompt=chat("hi"), sampling=common_pb2.SamplingParams(**sampling))
    with pytest.raises(grpc.RpcError) as info:
        router.Generate(req, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(f"{field}:"), info.value.details()
    _assert_still_serving(router)


def test_generate_prompt_longer_than_context_is_rejected_by_the_worker(router):
    req = router_pb2.GenerateRequest(prompt=common_pb2.Prompt(text="word " * 400))
    with pytest.raises(grpc.RpcError) as info:
        router.Generate(req, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("prompt:") and "context" in info.value.details()


def test_score_without_a_scoring_worker_is_unavailable(router):
    req = common_pb2.ScoreRequest(prompt=chat("q"), candidates=["a"], kind=common_pb2.SCORE_KIND_OUTCOME)
    with pytest.raises(grpc.RpcError) as info:
        router.Score(req, timeout=30)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "no worker can score outcomes" in info.value.details(), info.value.details()


@pytest.mark.processes
def test_no_reachable_worker_is_unavailable_within_the_deadline(logs):
    dead = f"127.0.0.1:{free_port()}"  # nothing listens here
    proc = start_router([dead], logs, name="router-no-worker")
    try:
        proc.wait_serving(timeout=60)
        with grpc.insecure_channel(proc.address) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            for _ in range(2):  # and it keeps serving after the first
                started = time.monotonic()
                with pytest.raises(grpc.RpcError) as info:
                    stub.Run(run_request("majority_vote", params={"n": 2}), timeout=5)
                elapsed = time.monotonic() - started
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
                assert dead in info.value.details()
                assert elapsed < 5
            with pytest.raises(grpc.RpcError) as info:
                list(stub.RunStream(run_request(), timeout=5))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert stub.ListControllers(router_pb2.ListControllersRequest(), timeout=5).controllers
    finally:
        proc.stop()
