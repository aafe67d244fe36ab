"""A worker killed (SIGKILL) while it streams: the router moves its unfinished samples to another worker
with the text so far, and the client's stream goes on to a complete result."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from client.launcher import start_router, start_worker
from tests.helpers import chat, run_request
from tests.tiny_model import build_tiny_llama
from trellis_rpc.v1 import common_pb2, router_pb2, router_pb2_grpc

# Starts workers and routers: the slower half of the suite.
pytestmark = pytest.mark.processes


@pytest.fixture(scope="module")
def long_model(tmp_path_factory):
    """The tiny Llama with room for long generations, so a worker is still busy when it is killed."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-1k"), max_position_embeddings=1024)


@pytest.fixture
def pair(long_model, logs):
    """Two workers with known ids behind a round-robin router (so the test knows where a task goes)."""
    workers = [start_worker(str(long_model), logs, name=f"failover-{wid}", extra=["--threads", "1", "--worker-id", wid])
               for wid in ("wa", "wb")]
    router = None
    try:
        for w in workers:
            w.wait_serving(timeout=120)
        router = start_router([w.address for w in workers], logs, name="failover-router",
                              extra=["--routing", "round_robin", "--worker-wait-seconds", "5"])
        router.wait_serving(timeout=60)
        with grpc.insecure_channel(router.address) as channel:
            yield router_pb2_grpc.RouterStub(channel), dict(zip(("wa", "wb"), workers, strict=True)), router
    finally:
        for proc in [router, *workers]:
            if proc is not None:
                proc.stop()


def next_worker(stub) -> str:
    """Round robin alternates: after a task served by X, the next goes to the other worker."""
    seen = set()
    while len(seen) < 2:  # both links up, so the alternation is between the two
        result = stub.Generate(router_pb2.GenerateRequest(prompt=chat("hi"), sampling=common_pb2.SamplingParams(
            max_tokens=1)), timeout=30)
        seen.add(result.worker_id)
    return "wb" if result.worker_id == "wa" else "wa"


def test_killed_worker_mid_stream_the_run_completes_on_the_other(pair):
    stub, workers, router = pair
    target = next_worker(stub)
    request = run_request("majority_vote", params={"n": 3}, max_tokens=500, ignore_eos=True, temperature=1.0, seed=3)
    stream = stub.RunStream(request, timeout=120)
    streamed: dict[str, int] = {}
    killed = False
    for event in stream:
        kind = event.WhichOneof("event")
        if kind == "delta":
            streamed[event.delta.branch] = streamed.get(event.delta.branch, 0) + event.delta.token_count
            if not killed:  # at the first tokens: the client reads behind the worker, so not later
                workers[target].popen.kill()  # SIGKILL: no drain, the stream just breaks
                killed = True
        elif kind == "result":
            result = event.result
    assert killed
    # Every sample still produced exactly its 500 tokens, part on each worker, streamed without a gap.
    assert streamed == {f"sample/{i}": 500 for i in range(3)}
    assert [len(c.text) > 0 for c in result.candidates] == [True] * 3
    assert result.usage.completion_tokens == 1500
    assert "migrating task" in router.log_tail(400)


def test_when_every_worker_is_gone_the_run_fails_unavailable_with_a_reason(pair):
    stub, workers, _ = pair
    for w in workers.values():
        w.popen.kill()
    with pytest.raises(grpc.RpcError) as info:
        stub.Run(run_request("native_generation", max_tokens=4), timeout=30)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "worker" in info.value.details()


def test_sigkill_under_64_streaming_runs_none_hangs_none_is_lost(pair):
    stub, workers, router = pair

    async def main():
        async with grpc.aio.insecure_channel(router.address) as channel:
            aio = router_pb2_grpc.RouterStub(channel)
            progress = asyncio.Event()
            streamed = 0

            async def one(i: int):
                nonlocal streamed
                request = run_request("native_generation", max_tokens=300, ignore_eos=True, seed=i)
                tokens = 0
                try:
                    async for event in aio.RunStream(request, timeout=90):
                        if event.WhichOneof("event") == "delta":
                            tokens += event.delta.token_count
                            streamed += event.delta.token_count
                            if streamed >= 64:
                                progress.set()
                        elif event.WhichOneof("event") == "result":
                            return ("ok", tokens, event.result.usage.completion_tokens)
                except grpc.aio.AioRpcError as err:
                    return (err.code().name, tokens, err.details())
                return ("ended without a result", tokens, None)

            runs = [asyncio.ensure_future(one(i)) for i in range(64)]
            await asyncio.wait_for(progress.wait(), 60)
            workers["wa"].popen.kill()
            return await asyncio.wait_for(asyncio.gather(*runs), 120)   # none hangs

    outcomes = asyncio.run(main())
    bad = [o for o in outcomes if o[0] != "ok"]
    assert not bad, bad[:3]
    # Every run got all of its tokens, and the client saw each exactly once.
    assert all(tokens == 300 == usage for _, tokens, usage in outcomes)
    assert router.log_tail(2000).count("migrating task") >= 1
