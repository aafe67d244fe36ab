"""A task no worker can take fails UNAVAILABLE with one sentence a user can act on: what it needed, where the
router looks for workers and what each source gave (and when, and whether the lookup failed), how many workers
are connected, and why each known worker cannot take it (issue 21)."""

from __future__ import annotations

import asyncio
import re
import time

import grpc
import pytest

from benchmarks.fake_engine import ConstantSpeedEngine
from client.launcher import free_port, start_router
from controllers import Generate, Prompt
from controllers.runtime import TaskFailed
from router.breaker import Breaker
from router.discovery import Discovery
from router.dispatch import RemoteRunner
from router.pool import NoWorker, WorkerPool
from trellis_client import Client, TrellisError
from trellis_rpc.v1 import common_pb2, worker_pb2
from worker_runtime.service import WorkerService

AGE = r"\d+\.\d s ago"
# A router that gives up on a missing worker at once, so that each failure below takes a fraction of a second.
QUICK = ["--worker-wait-seconds", "0.2", "--discovery-interval", "0.5"]


def unavailable(router) -> str:
    with Client(router.address) as client, pytest.raises(TrellisError) as info:
        client.run("native_generation", "hi", deadline=30)
    assert info.value.code == grpc.StatusCode.UNAVAILABLE, info.value.message
    return info.value.message


# ---- through a real router --------------------------------------------------------------------------------

@pytest.mark.processes
def test_an_empty_workers_file_says_so(logs, tmp_path):
    listing = tmp_path / "workers"
    listing.write_text("# filled in by the deploy, later\n")
    router = start_router([f"file:{listing}"], logs, name="router-empty-file", extra=QUICK)
    try:
        router.wait_serving(timeout=60)
        started = time.monotonic()
        message = unavailable(router)
        assert time.monotonic() - started < 5
        assert re.fullmatch(rf"no worker can generate: file:{re.escape(str(listing))} lists none \(read {AGE}\); "
                            r"0 connected", message), message
    finally:
        router.stop()


@pytest.mark.processes
def test_every_source_and_worker_is_named_with_what_went_wrong(logs, tmp_path):
    dead = f"127.0.0.1:{free_port()}"     # nothing listens here
    missing = tmp_path / "no-such-file"
    sources = [dead, "dns:no-such-host.invalid:50061", f"file:{missing}"]
    router = start_router(sources, logs, name="router-no-worker-sources", extra=QUICK)
    try:
        router.wait_serving(timeout=60)
        time.sleep(0.5)                   # the link to `dead` has tried to connect
        message = unavailable(router)
        assert message.startswith(f"no worker can generate: static {dead}; "), message
        assert re.search(rf"dns:no-such-host\.invalid:50061 failed {AGE} \([^)]+\), no answer yet", message), message
        assert re.search(rf"file:{re.escape(str(missing))} failed {AGE} \(No such file or directory\), no answer yet",
                         message), message
        assert "; 0 of 1 connected; " in message, message
        assert re.search(rf"{dead} is not connected \(.*(refused|connect)", message, re.IGNORECASE), message
        with Client(router.address) as client, pytest.raises(TrellisError) as info:
            client.score("q", ["a"], kind="verifier", deadline=30)
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
        assert info.value.message.startswith(f"no worker can verify: static {dead}; "), info.value.message
    finally:
        router.stop()


# ---- discovery's account of its sources -------------------------------------------------------------------

def test_discovery_describes_each_source(tmp_path):
    listing = tmp_path / "workers"
    listing.write_text("# two workers, for now\n10.0.0.5:50061,10.0.0.6:50061\n")   # a comma in a comment is no entry
    discovery = Discovery(None, ["10.0.0.9:50061", f"file:{listing}", "dns:missing-port"])
    assert discovery.sources()[1] == f"file:{listing} not looked up yet"
    assert discovery.resolve_all() == {"10.0.0.5:50061", "10.0.0.6:50061", "10.0.0.9:50061"}
    static, listed, bad = discovery.sources()
    assert static == "static 10.0.0.9:50061"
    assert re.fullmatch(rf"file:{re.escape(str(listing))} lists 2 \(read {AGE}\)", listed), listed
    assert re.fullmatch(rf"dns:missing-port failed {AGE} \('dns:missing-port': expected dns:NAME:PORT\), "
                        "no answer yet", bad), bad

    listing.unlink()                      # a failed re-read keeps the last answer, and says so
    assert discovery.resolve_all() == {"10.0.0.5:50061", "10.0.0.6:50061", "10.0.0.9:50061"}
    assert re.fullmatch(rf"file:{re.escape(str(listing))} failed {AGE} \(No such file or directory\), using its "
                        r"last answer \(2 workers\)", discovery.sources()[1]), discovery.sources()[1]

    discovery.specs = ["dns:localhost:50061"]   # a settings reload: the old entries are forgotten
    discovery.resolve_all()
    assert re.fullmatch(rf"dns:localhost:50061 resolves to \d+ workers? \(looked up {AGE}\)",
                        *discovery.sources()), discovery.sources()


# ---- the pool's message, for states a process test cannot easily produce ----------------------------------

def info(worker_id: str, model: str = "tiny", capabilities=(common_pb2.CAPABILITY_GENERATE,)) -> worker_pb2.WorkerInfo:
    return worker_pb2.WorkerInfo(worker_id=worker_id, model_id=model, capabilities=list(capabilities))


def fake_pool(addresses: list[str]) -> WorkerPool:
    """A pool that is never started: its links are in whatever state a test sets."""
    pool = WorkerPool(addresses)
    pool.sources = lambda: ["static " + ", ".join(addresses)]
    return pool


def connected(link, worker_info: worker_pb2.WorkerInfo) -> None:
    link.ready, link.info, link.last_error = True, worker_info, "not connected yet"


async def why(pool: WorkerPool, **kwargs) -> str:
    with pytest.raises(NoWorker) as raised:
        await pool.pick(**kwargs)
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE
    return raised.value.message


def test_workers_of_another_model_or_capability_and_draining_ones_are_named():
    async def main():
        pool = fake_pool(["10.0.0.1:1", "10.0.0.2:1", "10.0.0.3:1", "10.0.0.4:1"])
        other_model, scorer, leaving, down = pool.workers
        connected(other_model, info("w1", model="big"))
        connected(scorer, info("w2", capabilities=[common_pb2.CAPABILITY_SCORE_OUTCOME,
                                                   common_pb2.CAPABILITY_SCORE_PROCESS]))
        connected(leaving, info("w3"))
        leaving._pending["t1"] = asyncio.Queue()          # a task still running there
        down.last_error = "UNAVAILABLE: Deadline Exceeded"
        pool.update({"10.0.0.1:1", "10.0.0.2:1", "10.0.0.4:1"})   # discovery no longer lists 10.0.0.3
        try:
            message = await why(pool, model="tiny")
            assert message == (
                "no worker can generate for model 'tiny': static 10.0.0.1:1, 10.0.0.2:1, 10.0.0.3:1, 10.0.0.4:1; "
                "3 of 4 connected; 10.0.0.1:1 serves model 'big'; "
                "10.0.0.2:1 cannot generate (it can score outcomes, score process steps); "
                "10.0.0.3:1 is draining: discovery no longer lists it (1 task still running there); "
                "10.0.0.4:1 is not connected (UNAVAILABLE: Deadline Exceeded)"), message
            pinned = await why(pool, worker_id="w9")
            assert pinned.startswith("worker 'w9', which holds the sequence to continue, is not connected: "), pinned
            assert "10.0.0.1:1 is worker 'w1'" in pinned, pinned
        finally:
            leaving._pending.clear()
            leaving.ready = False
            await pool.close()

    asyncio.run(main())


def test_many_workers_are_named_up_to_eight_then_counted():
    async def main():
        pool = fake_pool([f"10.0.0.{i}:1" for i in range(1, 12)])
        pool.sources = None
        try:
            message = await why(pool)
            assert message.startswith("no worker can generate: 0 of 11 connected; 10.0.0.1:1 is not connected yet; ")
            assert "10.0.0.8:1 is not connected yet" in message and "10.0.0.9:1" not in message
            assert message.endswith("; and 3 more"), message
        finally:
            await pool.close()

    asyncio.run(main())


class FlakyEngine(ConstantSpeedEngine):
    async def generate(self, *args, **kwargs):
        raise RuntimeError("GPU fell off the bus")
        yield  # an async generator, like the engine's


def test_a_worker_ejected_by_the_breaker_is_named_with_when_it_is_retried():
    async def main():
        service = WorkerService(worker_id="flaky")
        service.attach(FlakyEngine())
        pool = WorkerPool([], services=[service])
        link = pool.workers[0]
        link.breaker = Breaker(threshold=2, base_cooldown_s=30)
        pool.start()
        runner = RemoteRunner(pool, "run", "", common_pb2.SamplingParams(max_tokens=2), worker_wait_s=5)
        try:
            for _ in range(2):
                with pytest.raises(TaskFailed):
                    await runner.generate(Generate(Prompt(text="x")), lambda d: None)
            assert link.breaker.open
            message = await why(pool)
            assert re.fullmatch(r"no worker can generate: 1 of 1 connected; in-process:flaky was ejected by the "
                                r"breaker after 2 failed tasks in a row \(health check in (29|30)\.\d s\)",
                                message), message
            link.breaker.retry_at = 0.0
            assert (await why(pool)).endswith("(back once its health check passes)")
        finally:
            await pool.close()

    asyncio.run(main())


def test_a_pool_with_no_worker_and_no_discovery_says_none_is_configured():
    async def main():
        message = await why(WorkerPool([]), capability=common_pb2.CAPABILITY_SCORE_PROCESS)
        assert message == "no worker can score process steps: no worker configured"

    asyncio.run(main())
