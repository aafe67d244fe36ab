"""Admission control: a full router answers RESOURCE_EXHAUSTED with a retry hint and recovers; waiting runs
go in priority order; per-client limits."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from client.launcher import start_router
from router.admission import Admission, Exhausted
from tests.helpers import rich_error, run_request
from trellis_rpc.v1 import router_pb2_grpc


def test_priority_then_arrival_order_and_limits():
    async def main():
        adm = Admission(max_running=1, max_queued=3, per_client=3)
        first = adm.reserve(0, "a")
        assert first.admitted.is_set()
        low, high, high2 = adm.reserve(0, "b"), adm.reserve(5, "c"), adm.reserve(5, "b")
        assert not any(t.admitted.is_set() for t in (low, high, high2))
        with pytest.raises(Exhausted) as info:
            adm.reserve(9, "d")          # one running, three waiting: full, whatever the priority
        assert "router is full" in info.value.message and info.value.retry_after_ms >= 100
        order = []
        for _ in range(3):
            adm.release(first if not order else order[-1])
            first = None
            nxt = next(t for t in (low, high, high2) if t.admitted.is_set() and t not in order)
            order.append(nxt)
        assert order == [high, high2, low]
        # A waiting run that gives up leaves the queue without ever running.
        waiting = adm.reserve(0, "e")
        adm.release(waiting)
        assert adm.queued == 0 and adm.running == 1

    asyncio.run(main())


def test_per_client_limit():
    adm = Admission(max_running=0, per_client=2)
    adm.reserve(0, "greedy")
    adm.reserve(0, "greedy")
    with pytest.raises(Exhausted, match="client 'greedy' already has 2 runs"):
        adm.reserve(0, "greedy")
    adm.reserve(0, "polite")


def test_full_router_answers_resource_exhausted_and_recovers(tiny_worker, logs):
    router = start_router([tiny_worker.address], logs, name="small-router",
                          extra=["--max-running-runs", "1", "--max-queued-runs", "1"])

    async def burst():
        """Six runs at once against room for one running and one waiting."""
        async with grpc.aio.insecure_channel(router.address) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            long = run_request("native_generation", max_tokens=200, ignore_eos=True)

            async def one():
                try:
                    return await stub.Run(long, timeout=60)
                except grpc.aio.AioRpcError as err:
                    return err

            return await asyncio.gather(*(one() for _ in range(6)))

    try:
        router.wait_serving(timeout=60)
        outcomes = asyncio.run(burst())
        done = [o for o in outcomes if not isinstance(o, grpc.aio.AioRpcError)]
        refused = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
        assert len(done) >= 2 and refused, outcomes
        for err in refused:
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "router is full" in err.details()
            assert int(dict(err.trailing_metadata() or ())["retry-after-ms"]) >= 100
            assert rich_error(err)["retry_ms"] >= 100   # the same, as google.rpc.RetryInfo
        assert max(r.timings.queue_ms for r in done) > 0   # one waited its turn
        # Recovered: a new run goes through.
        with grpc.insecure_channel(router.address) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            assert stub.Run(run_request("native_generation", max_tokens=2), timeout=30).usage.completion_tokens >= 1
    finally:
        router.stop()
