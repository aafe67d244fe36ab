"""The fault suite (issue 9), with real processes on loopback: a worker that hangs without answering
(SIGSTOP), a slow worker, a router restarted under retrying clients, every worker gone and back. Every
run completes or fails with a clear status within its deadline, none hangs, and afterwards every live
worker's KV usage returns to zero (read from its Prometheus endpoint). A worker killed mid-stream is
tests/test_failover.py."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from benchmarks.fake_engine import ConstantSpeedEngine
from client.launcher import Process, free_port, start_router, start_worker
from controllers import Generate, Prompt
from controllers.runtime import TaskFailed
from router.dispatch import RemoteRunner
from router.pool import WorkerPool
from router.routing import RoutingPolicy
from tests.helpers import chat, run_request
from tests.test_observability import scrape, total
from tests.tiny_model import build_tiny_llama
from trellis_rpc.errors import invalid
from trellis_rpc.v1 import common_pb2, router_pb2, router_pb2_grpc
from worker_runtime.service import WorkerService

# Starts workers and routers: the slower half of the suite.
pytestmark = pytest.mark.processes

CLEAR = ("UNAVAILABLE", "DEADLINE_EXCEEDED")


@dataclass
class Worker:
    """A worker process that can be stopped, killed and started again on the same ports."""

    wid: str
    model: Path
    logs: Path
    port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    proc: Process | None = None
    starts: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self.starts += 1
        self.proc = start_worker(str(self.model), self.logs, port=self.port, name=f"faults-{self.wid}-{self.starts}",
                                 extra=["--threads", "1", "--worker-id", self.wid, "--metrics-port",
                                        str(self.metrics_port), "--metrics-host", "127.0.0.1"])

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive:
            self.proc.popen.send_signal(sig)

    def kill(self) -> None:
        self.signal(signal.SIGCONT)
        self.proc.popen.kill()
        self.proc.popen.wait(10)

    def load(self) -> dict[str, float]:
        samples = scrape(self.metrics_port)
        return {name: total(samples, f"trellis_worker_{name}")
                for name in ("kv_blocks_used", "running_sequences", "queue_depth")}

    def tasks(self, code: str | None = None) -> float:
        labels = {"kind": "generate"} | ({"code": code} if code else {})
        return total(scrape(self.metrics_port), "trellis_worker_tasks_total", **labels)


def wait_idle(workers: list[Worker], timeout: float = 10.0) -> float:
    """Every live worker's KV blocks, running sequences and queue back to zero within timeout: no leaked
    blocks. Returns how long it took."""
    start = time.monotonic()
    while True:
        loads = {w.wid: w.load() for w in workers if w.alive}
        if all(v == 0 for load in loads.values() for v in load.values()):
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"workers still hold work {timeout:.0f} s after the scenario: {loads}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """The tiny random Llama (tests/tiny_model.py) with a 1k context: a migrated sample resumes as the
    prompt plus its text so far, and a random model's text re-tokenizes to up to 3x its tokens (invalid
    UTF-8 comes back as U+FFFD), which must still fit."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-faults"), max_position_embeddings=1024)


@pytest.fixture(scope="module")
def workers(model, logs):
    """Two workers shared by the scenarios; each scenario starts its own router."""
    pair = [Worker("fa", model, logs), Worker("fb", model, logs)]
    try:
        for w in pair:
            w.start()
        for w in pair:
            w.proc.wait_serving(timeout=120)
        yield pair
    finally:
        for w in pair:                 # drain both at once
            w.signal(signal.SIGCONT)
            w.signal(signal.SIGTERM)
        for w in pair:
            if w.proc is not None:
                w.proc.stop()


@pytest.fixture
def cluster(workers):
    """Both workers running and idle before the scenario (a scenario may have killed or stopped them)."""
    for w in workers:
        w.signal(signal.SIGCONT)
        if not w.alive:
            w.start()
    for w in workers:
        w.proc.wait_serving(timeout=120)
    wait_idle(workers)
    return workers


@dataclass
class RouterProcess:
    proc: Process
    metrics_port: int

    @property
    def address(self) -> str:
        return self.proc.address

    def metric(self, name: str, **labels: str) -> float:
        return total(scrape(self.metrics_port), name, **labels)


def launch_router(workers: list[Worker], logs: Path, name: str, port: int | None = None) -> RouterProcess:
    metrics_port = free_port()
    proc = start_router([w.address for w in workers], logs, name=name, port=port,
                        extra=["--metrics-port", str(metrics_port), "--metrics-host", "127.0.0.1"])
    try:
        proc.wait_serving(timeout=60)
    except BaseException:
        proc.stop()
        raise
    return RouterProcess(proc, metrics_port)


@contextlib.contextmanager
def router_for(workers: list[Worker], logs: Path, name: str):
    router = launch_router(workers, logs, name)
    try:
        yield router
    finally:
        router.proc.stop()


class Flow:
    """Tokens each run has streamed; `started` is set once every run has streamed some, so each has a
    task on a worker at that moment."""

    def __init__(self, runs: int) -> None:
        self.tokens = [0] * runs
        self.started = asyncio.Event()

    def sink(self, i: int):
        def add(n: int) -> None:
            self.tokens[i] += n
            if all(self.tokens):
                self.started.set()
        return add


@dataclass
class Outcome:
    code: str            # "OK" or the gRPC status code's name
    tokens: int          # token deltas the client saw (of the last attempt)
    elapsed: float       # seconds from the first call to the end, retries included
    details: str = ""
    attempts: int = 1


async def stream_run(stub: router_pb2_grpc.RouterStub, request: router_pb2.RunRequest, deadline_s: float,
                     on_tokens=None) -> Outcome:
    start = time.monotonic()
    tokens = 0
    try:
        async for event in stub.RunStream(request, timeout=deadline_s):
            kind = event.WhichOneof("event")
            if kind == "delta":
                tokens += event.delta.token_count
                if on_tokens is not None:
                    on_tokens(event.delta.token_count)
            elif kind == "result":
                return Outcome("OK", tokens, time.monotonic() - start, str(event.result.usage.completion_tokens))
    except grpc.aio.AioRpcError as err:
        return Outcome(err.code().name, tokens, time.monotonic() - start, err.details() or "")
    return Outcome("ended without a result", tokens, time.monotonic() - start)


def long_run(seed: int, max_tokens: int = 200, n: int = 1) -> router_pb2.RunRequest:
    if n == 1:
        return run_request("native_generation", max_tokens=max_tokens, ignore_eos=True, seed=seed)
    return run_request("majority_vote", params={"n": n}, max_tokens=max_tokens, ignore_eos=True, seed=seed,
                       temperature=1.0)


def generate_until(stub: router_pb2_grpc.RouterStub, wanted: set[str], within_s: float) -> set[str]:
    """Router.Generate until every worker id in wanted has served one (UNAVAILABLE meanwhile is fine)."""
    seen: set[str] = set()
    until = time.monotonic() + within_s
    while not wanted <= seen:
        assert time.monotonic() < until, f"only {seen} of {wanted} serve {within_s:.0f} s later"
        try:
            seen.add(stub.Generate(router_pb2.GenerateRequest(
                prompt=chat("hi"), sampling=common_pb2.SamplingParams(max_tokens=2)), timeout=10).worker_id)
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.UNAVAILABLE, err
            time.sleep(0.2)
    return seen


def summary(outcomes: list[Outcome]) -> list[tuple]:
    return sorted((o.code, o.attempts, round(o.elapsed, 1)) for o in outcomes)


# ---- 1. a worker that hangs without answering -------------------------------------------------------


def test_sigstopped_worker_runs_move_to_the_healthy_one_none_hangs(cluster, logs):
    hung, healthy = cluster
    deadline_s = 20.0
    with router_for(cluster, logs, "faults-router-stop") as router:
        async def main() -> tuple[list[Outcome], float]:
            async with grpc.aio.insecure_channel(router.address) as channel:
                stub = router_pb2_grpc.RouterStub(channel)
                flow = Flow(8)
                runs = [asyncio.ensure_future(stream_run(stub, long_run(i), deadline_s, flow.sink(i)))
                        for i in range(8)]
                await asyncio.wait_for(flow.started.wait(), 15)
                # Hangs: its socket stays open, nothing answers. The router gives up on the link after
                # SILENCE_S (5 s) without a message (router/worker_connection.py); gRPC keepalive alone took 60 s.
                hung.signal(signal.SIGSTOP)
                stopped = time.monotonic()
                # Runs that arrive before the router can know: some are routed to the hung worker.
                for i in range(8, 12):
                    runs.append(asyncio.ensure_future(stream_run(stub, long_run(i), deadline_s)))
                    await asyncio.sleep(0.2)
                outcomes = await asyncio.wait_for(asyncio.gather(*runs), deadline_s + 10)   # none hangs
                return outcomes, time.monotonic() - stopped

        try:
            outcomes, settled = asyncio.run(main())
        finally:
            hung.signal(signal.SIGCONT)
        print(f"\nSIGSTOP: every run settled {settled:.1f} s after the stop: {summary(outcomes)}")
        assert all(o.code == "OK" or o.code in CLEAR for o in outcomes), outcomes
        assert all(o.elapsed < deadline_s for o in outcomes), outcomes
        # With a healthy worker beside it, no run even fails: the hung worker's tasks move there.
        assert [o.code for o in outcomes] == ["OK"] * 12, outcomes
        assert all(o.tokens == 200 for o in outcomes)
        assert router.metric("trellis_router_migrations_total") >= 1
        assert "hung or unreachable" in router.proc.log_tail(400)

        # SIGCONT: the router reconnects, the worker serves again and has dropped what it held.
        resumed = time.monotonic()
        with grpc.insecure_channel(router.address) as channel:
            generate_until(router_pb2_grpc.RouterStub(channel), {hung.wid, healthy.wid}, 20)
        print(f"SIGCONT: serving again after {time.monotonic() - resumed:.1f} s; idle after {wait_idle(cluster):.2f} s")


# ---- 2. a slow worker next to a fast one --------------------------------------------------------------


@contextlib.contextmanager
def pulsed(worker: Worker, stop_s: float = 0.4, run_s: float = 0.1):
    """The worker runs run_s out of every stop_s + run_s seconds (SIGSTOP / SIGCONT): a slow worker,
    each pause well short of the router's silence limit."""
    done = threading.Event()

    def pulse() -> None:
        while not done.is_set():
            worker.signal(signal.SIGSTOP)
            done.wait(stop_s)
            worker.signal(signal.SIGCONT)
            done.wait(run_s)

    thread = threading.Thread(target=pulse, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        worker.signal(signal.SIGCONT)


def test_slow_worker_runs_finish_in_time_and_the_router_prefers_the_fast_one(cluster, logs):
    fast, slow = cluster
    deadline_s = 15.0
    with router_for(cluster, logs, "faults-router-slow") as router:
        before = {w.wid: w.tasks() for w in cluster}

        async def client(stub, k: int) -> list[Outcome]:   # closed loop: the next run when the last is done
            # 16 runs each: the first runs land on both workers before any load report, and with too few
            # after them the split is at the mercy of that start (it came out 21 / 11 once in 10 runs of 8).
            return [await stream_run(stub, long_run(100 * k + i, max_tokens=32), deadline_s) for i in range(16)]

        async def main() -> list[Outcome]:
            async with grpc.aio.insecure_channel(router.address) as channel:
                stub = router_pb2_grpc.RouterStub(channel)
                per_client = await asyncio.wait_for(asyncio.gather(*(client(stub, k) for k in range(4))), 60)
                return [o for outcomes in per_client for o in outcomes]

        started = time.monotonic()
        with pulsed(slow):
            outcomes = asyncio.run(main())
        took = time.monotonic() - started
        served = {w.wid: w.tasks() - before[w.wid] for w in cluster}
        print(f"\nslow worker: {len(outcomes)} runs in {took:.1f} s, tasks per worker {served}, "
              f"slowest run {max(o.elapsed for o in outcomes):.1f} s")
        assert [o.code for o in outcomes] == ["OK"] * 64, outcomes
        assert all(o.tokens == 32 and o.elapsed < deadline_s for o in outcomes)
        assert served[fast.wid] + served[slow.wid] == 64
        assert served[fast.wid] >= 2 * served[slow.wid], served        # the less loaded worker gets the work
        assert "worker disconnected" not in router.proc.log_tail(400)  # slow is not hung: no false alarm
        wait_idle(cluster)


# ---- 3. the router restarts while clients retry ------------------------------------------------------

# A client that retries reconnects soon (gRPC's default reconnect backoff starts at 1 s and grows 1.6x).
RETRYING_CLIENT = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                   ("grpc.max_reconnect_backoff_ms", 1000)]


async def retrying_run(stub, request: router_pb2.RunRequest, deadline_s: float, on_tokens=None) -> Outcome:
    """A client that retries on UNAVAILABLE with exponential backoff, all within one deadline."""
    start = time.monotonic()
    backoff, attempts = 0.1, 0
    while True:
        attempts += 1
        outcome = await stream_run(stub, request, deadline_s - (time.monotonic() - start), on_tokens)
        if outcome.code != "UNAVAILABLE" or time.monotonic() - start + backoff >= deadline_s:
            outcome.elapsed, outcome.attempts = time.monotonic() - start, attempts
            return outcome
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, 1.0)


def test_router_restart_clients_retry_and_workers_free_the_abandoned_tasks(cluster, logs):
    deadline_s = 30.0
    port = free_port()
    routers = [launch_router(cluster, logs, "faults-router-1", port=port)]
    cancelled_before = sum(w.tasks("CANCELLED") for w in cluster)
    try:
        async def main() -> tuple[list[Outcome], float]:
            async with grpc.aio.insecure_channel(routers[0].address, options=RETRYING_CLIENT) as channel:
                stub = router_pb2_grpc.RouterStub(channel)
                flow = Flow(8)
                runs = [asyncio.ensure_future(retrying_run(stub, long_run(i, n=4), deadline_s, flow.sink(i)))
                        for i in range(8)]
                await asyncio.wait_for(flow.started.wait(), 15)
                routers[0].proc.popen.kill()   # SIGKILL: no drain; the clients' streams and the worker links break
                killed = time.monotonic()
                await asyncio.sleep(0.5)       # the clients retry into a closed port meanwhile
                routers.append(await asyncio.to_thread(launch_router, cluster, logs, "faults-router-2", port))
                back = time.monotonic() - killed
                return await asyncio.wait_for(asyncio.gather(*runs), deadline_s + 10), back

        outcomes, back = asyncio.run(main())
        print(f"\nrouter restart: the new router served {back:.1f} s after the kill; {summary(outcomes)}")
        assert [o.code for o in outcomes] == ["OK"] * 8, outcomes
        assert all(o.elapsed < deadline_s and o.tokens == 4 * 200 for o in outcomes), outcomes
        assert all(o.attempts > 1 for o in outcomes)    # each was cut off by the kill, then done on a retry
        idle = wait_idle(cluster)
        # What the dead router left on the workers was cancelled there, not generated to the end.
        cancelled = sum(w.tasks("CANCELLED") for w in cluster) - cancelled_before
        print(f"abandoned tasks cancelled on the workers: {cancelled:.0f}; idle after {idle:.2f} s")
        assert cancelled == 8
    finally:
        for router in routers:
            router.proc.stop()


# ---- 4. every worker gone, then back --------------------------------------------------------------------


def test_all_workers_gone_runs_fail_fast_unavailable_then_succeed_when_they_return(cluster, logs):
    deadline_s = 30.0
    with router_for(cluster, logs, "faults-router-gone") as router:
        async def main() -> tuple[list[Outcome], list[Outcome]]:
            async with grpc.aio.insecure_channel(router.address) as channel:
                stub = router_pb2_grpc.RouterStub(channel)
                flow = Flow(6)
                runs = [asyncio.ensure_future(stream_run(stub, long_run(i), deadline_s, flow.sink(i)))
                        for i in range(6)]
                await asyncio.wait_for(flow.started.wait(), 15)
                for w in cluster:
                    w.kill()
                in_flight = await asyncio.wait_for(asyncio.gather(*runs), deadline_s + 10)
                fresh = await asyncio.wait_for(asyncio.gather(
                    *(stream_run(stub, long_run(10 + i, max_tokens=8), deadline_s) for i in range(3))), deadline_s + 10)
                return in_flight, fresh

        in_flight, fresh = asyncio.run(main())
        print(f"\nall workers gone: in flight {summary(in_flight)}, new {summary(fresh)}\n{fresh[0].details}")
        # Nothing waits out its 30 s deadline: the router fails them after --worker-wait-seconds (2 s).
        for o in in_flight + fresh:
            assert o.code == "UNAVAILABLE" and o.elapsed < 5, o
            assert all(w.address in o.details for w in cluster), o.details   # names each worker and why

        # The workers come back on the same ports: the router reconnects and runs succeed again.
        restarted = time.monotonic()
        for w in cluster:
            w.start()
        for w in cluster:
            w.proc.wait_serving(timeout=60)
        serving = time.monotonic() - restarted
        with grpc.insecure_channel(router.address) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            generate_until(stub, {w.wid for w in cluster}, 15)
            routed = time.monotonic() - restarted
            assert stub.Run(long_run(99, max_tokens=16), timeout=deadline_s).usage.completion_tokens == 16
        print(f"workers serving {serving:.1f} s after their restart, both routed to after {routed:.1f} s")
        wait_idle(cluster)


# ---- the wrong status scenario 1 found, in process ----------------------------------------------------------


class RefusingEngine(ConstantSpeedEngine):
    """Refuses any prompt longer than the original one-character prompt, as a worker refuses a resumed
    prompt that no longer fits its context."""

    async def generate(self, task_id, prompt, cfg, source=None, keep_ttl_s=None, run=None):
        if len(prompt.text) > 1:
            raise invalid("prompt", f"{len(prompt.text)} tokens do not fit the model's context of 1 token")
        async for event in super().generate(task_id, prompt, cfg, source, keep_ttl_s):
            yield event


def test_a_sample_no_worker_will_resume_fails_unavailable_not_invalid_argument():
    """A worker's link breaks mid-stream and the other worker refuses the resumed prompt (prompt + text so
    far, INVALID_ARGUMENT): the client's request was fine, so the run fails UNAVAILABLE, which it may
    retry, naming both causes; it is not moved again."""
    async def main():
        services = []
        for wid, engine in (("dies", ConstantSpeedEngine(step_s=0.01)), ("refuses", RefusingEngine())):
            service = WorkerService(worker_id=wid)
            service.attach(engine)
            services.append(service)
        pool = WorkerPool([], services=services, routing=RoutingPolicy("round_robin"))   # first task: "dies"
        pool.start()
        runner = RemoteRunner(pool, "run", "", common_pb2.SamplingParams(max_tokens=50), worker_wait_s=5,
                              max_migrations=2)
        try:
            while not all(w.ready for w in pool.workers):
                await asyncio.sleep(0.01)
            closing = []

            def on_token(_delta) -> None:
                if not closing:   # the link to "dies" breaks after its first token
                    closing.append(asyncio.ensure_future(pool.workers[0].close()))

            with pytest.raises(TaskFailed) as failed:
                await runner.generate(Generate(Prompt(text="x")), on_token)
            await asyncio.gather(*closing)
            return failed.value.failure, runner.usage.migrations
        finally:
            await pool.close()

    failure, migrations = asyncio.run(main())
    assert failure.code == "UNAVAILABLE", failure
    assert "disconnected" in failure.message and "could not resume on another worker" in failure.message
    assert "do not fit" in failure.message
    assert migrations == 1
