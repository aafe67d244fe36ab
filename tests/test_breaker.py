"""Circuit breaker: a worker that keeps failing tasks is ejected from routing, and readmitted once healthy."""

from __future__ import annotations

import asyncio

import grpc

from benchmarks.fake_engine import ConstantSpeedEngine
from controllers import Generate, Prompt
from controllers.runtime import TaskFailed
from router.breaker import Breaker
from router.dispatch import RemoteRunner
from router.pool import WorkerPool
from router.routing import RoutingPolicy
from trellis_rpc.v1 import common_pb2
from worker_runtime.service import WorkerService


class FlakyEngine(ConstantSpeedEngine):
    """Fails every task with an engine error while broken (the worker answers INTERNAL)."""

    broken = True

    async def generate(self, *args, **kwargs):
        if self.broken:
            raise RuntimeError("GPU fell off the bus")
        async for event in super().generate(*args, **kwargs):
            yield event


def test_breaker_counts_only_unwell_failures_in_a_row():
    b = Breaker(threshold=3)
    for code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INTERNAL):
        assert not b.record(code)
    assert not b.record(None) and b.failures == 0        # a success resets the count
    assert [b.record(grpc.StatusCode.INTERNAL) for _ in range(3)] == [False, False, True]
    assert b.open


def test_a_failing_worker_is_ejected_then_readmitted_when_healthy():
    async def main():
        flaky, good = FlakyEngine(), ConstantSpeedEngine()
        services = []
        for wid, engine in (("flaky", flaky), ("good", good)):
            service = WorkerService(worker_id=wid)
            service.attach(engine)
            services.append(service)
        pool = WorkerPool([], services=services, routing=RoutingPolicy("round_robin"))
        for w in pool.workers:
            w.breaker = Breaker(threshold=3, base_cooldown_s=0.3)
        pool.start()
        runner = RemoteRunner(pool, "run", "", common_pb2.SamplingParams(max_tokens=2), worker_wait_s=5)
        served, failures = [], 0
        try:
            for _ in range(12):
                try:
                    out = await runner.generate(Generate(Prompt(text="x")), lambda d: None)
                    served.append(out.worker_id)
                except TaskFailed as err:
                    assert err.failure.code == "INTERNAL"
                    failures += 1
            flaky_link = next(w for w in pool.workers if w.info.worker_id == "flaky")
            assert failures == 3 and flaky_link.breaker.open    # ejected after three failures in a row
            assert served[-6:] == ["good"] * 6                 # and no longer picked
            flaky.broken = False
            await asyncio.sleep(0.6)                            # cooldown, then the health check passes
            assert not flaky_link.breaker.open
            seen = set()
            for _ in range(4):
                seen.add((await runner.generate(Generate(Prompt(text="x")), lambda d: None)).worker_id)
            assert seen == {"flaky", "good"}
        finally:
            await pool.close()

    asyncio.run(main())


def test_a_migration_passes_over_the_worker_that_just_failed_the_task():
    """pick(avoid=...) skips the workers that failed this task while another can take it (a worker whose backend
    died keeps its link, and prefix affinity would send the resumed task straight back); with no other, it
    still picks one rather than failing the task."""
    async def main():
        services = []
        for wid in ("a", "b"):
            service = WorkerService(worker_id=wid)
            service.attach(ConstantSpeedEngine())
            services.append(service)
        pool = WorkerPool([], services=services, routing=RoutingPolicy("kv"))
        pool.start()
        try:
            picks = {(await pool.pick(prompt_key="same prompt" * 20, avoid={"a"}, wait_s=5)).info.worker_id
                     for _ in range(6)}
            assert picks == {"b"}
            last_resort = await pool.pick(prompt_key="same prompt" * 20, avoid={"a", "b"}, wait_s=5)
            assert last_resort.info.worker_id in {"a", "b"}
        finally:
            await pool.close()

    asyncio.run(main())
