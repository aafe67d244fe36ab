"""Routing policies: KV-prefix overlap against load, least loaded, round robin; and KV-aware routing
through a real router in front of two workers (the prefix cache hits say where the KV was)."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import pytest

from client.launcher import start_router, start_worker
from router.routing import CHARS_PER_BLOCK, RoutingPolicy, prefix_hashes
from tests.helpers import chat
from trellis_rpc.v1 import common_pb2, router_pb2, router_pb2_grpc


@dataclass
class FakeWorker:
    address: str
    outstanding: int = 0
    queued_running: int = 0
    kv_blocks: int = 0

    @property
    def reported_load(self) -> tuple[int, int]:
        return self.queued_running, self.kv_blocks


LONG = "You are a careful assistant. " * 20


def test_prefix_hashes_are_chained_over_full_chunks():
    a = prefix_hashes(LONG + "question one")
    b = prefix_hashes(LONG + "question two, a different one")
    assert len(a) == len(LONG + "question one") // CHARS_PER_BLOCK
    shared = len(LONG) // CHARS_PER_BLOCK
    assert a[:shared] == b[:shared]
    # A chunk's hash stands for the whole prefix: the same chunk after a different start differs.
    assert prefix_hashes("x" + LONG)[shared - 1] != a[shared - 1]


def test_kv_policy_prefers_the_worker_that_holds_the_prefix():
    router = RoutingPolicy("kv")
    workers = [FakeWorker("a"), FakeWorker("b"), FakeWorker("c")]
    hashes = prefix_hashes(LONG + "first")
    first = router.choose(workers, hashes)
    router.record(first.worker, hashes)
    for _ in range(5):  # rotation would spread these if overlap did not count
        again = router.choose(workers, prefix_hashes(LONG + "second"))
        assert again.worker is first.worker and again.overlap_blocks == len(LONG) // CHARS_PER_BLOCK


def test_kv_policy_spills_over_when_the_holder_is_loaded():
    router = RoutingPolicy("kv")
    holder, idle = FakeWorker("a"), FakeWorker("b")
    hashes = prefix_hashes(LONG)
    router.record(holder, hashes)
    holder.kv_blocks = 3 * len(hashes)  # busier than re-prefilling the prompt elsewhere would cost
    assert router.choose([holder, idle], hashes).worker is idle
    holder.kv_blocks = 0
    assert router.choose([holder, idle], hashes).worker is holder


def test_kv_policy_balances_when_load_is_badly_skewed():
    router = RoutingPolicy("kv", overlap_weight=1000.0)
    holder, idle = FakeWorker("a", queued_running=200), FakeWorker("b", queued_running=10)
    hashes = prefix_hashes(LONG)
    router.record(holder, hashes)
    decision = router.choose([holder, idle], hashes)
    assert decision.worker is idle and decision.policy == "kv-balance"


def test_a_run_s_next_task_goes_home_unless_home_is_overloaded():
    """A short prompt has no prefix blocks to weigh, so without a home the least loaded would win; the worker that
    ran the run's last task keeps it while its load is within twice the least loaded's plus a slack of 4."""
    router = RoutingPolicy("kv")
    home, idle = FakeWorker("a", outstanding=3), FakeWorker("b")
    assert router.choose([home, idle]).worker is idle
    decision = router.choose([home, idle], home="a")
    assert decision.worker is home and decision.policy == "run"
    home.outstanding = 5
    assert router.choose([home, idle], home="a").worker is idle
    idle.outstanding = 2      # 5 <= 2 * 2 + 4
    assert router.choose([home, idle], home="a").worker is home
    assert router.choose([home, idle], home="gone").worker is idle
    assert RoutingPolicy("least_loaded").choose([home, idle], home="a").worker is idle   # kv policy only


def test_forgetting_a_worker_drops_what_it_held():
    router = RoutingPolicy("kv")
    a, b = FakeWorker("a"), FakeWorker("b")
    hashes = prefix_hashes(LONG)
    router.record(a, hashes)
    router.forget(a)
    assert router.choose([a, b], hashes).overlap_blocks == 0


def test_round_robin_and_least_loaded():
    workers = [FakeWorker("a"), FakeWorker("b", outstanding=3), FakeWorker("c")]
    rr = RoutingPolicy("round_robin")
    assert [rr.choose(workers).worker.address for _ in range(6)] == ["a", "b", "c", "a", "b", "c"]
    ll = RoutingPolicy("least_loaded")
    assert {ll.choose(workers).worker.address for _ in range(6)} == {"a", "c"}


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="routing policy"):
        RoutingPolicy("random")


@pytest.fixture(scope="module")
def two_workers(tiny_model, logs):
    """Fresh workers: the session's shared one may hold other tests' kept sequences, which count as load."""
    procs = [start_worker(str(tiny_model), logs, name=f"routing-worker-{i}", extra=["--threads", "1"])
             for i in range(2)]
    try:
        for p in procs:
            p.wait_serving(timeout=120)
        yield procs
    finally:
        for p in procs:
            p.stop()


def routed(workers, logs, policy: str):
    router = start_router([w.address for w in workers], logs, name=f"router-{policy}", extra=["--routing", policy])
    router.wait_serving(timeout=60)
    return router


@pytest.mark.processes
@pytest.mark.parametrize("policy", ["kv", "round_robin"])
def test_requests_sharing_a_prefix_land_where_their_kv_is(two_workers, logs, policy):
    router = routed(two_workers, logs, policy)
    try:
        with grpc.insecure_channel(router.address) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            stub.ListControllers(router_pb2.ListControllersRequest(), timeout=30, wait_for_ready=True)
            results = []
            for i in range(6):
                req = router_pb2.GenerateRequest(
                    prompt=chat(f"({policy}) " + "Step 1: add the numbers. Step 2: check the result. " * 6
                                + f"Question {i}?"),
                    sampling=common_pb2.SamplingParams(max_tokens=2, temperature=0))
                results.append(stub.Generate(req, timeout=60))
    finally:
        router.stop()
    workers = [r.worker_id for r in results]
    cached = [r.usage.cached_prompt_tokens for r in results]
    if policy == "kv":
        assert len(set(workers)) == 1, workers
        assert all(c > 0 for c in cached[1:]), cached
    else:
        assert len(set(workers)) == 2, workers
        # Each worker prefills the shared prefix once: the first request on each misses.
        assert sum(c == 0 for c in cached) >= 2, cached


@pytest.mark.processes
def test_a_run_s_tasks_stay_on_its_worker(two_workers, logs):
    """budget_majority_vote with parallel=1 sends its samples one task after another; the prompt is too short for
    prefix blocks, so only the run's home keeps them on one worker (the router's decisions say "run")."""
    from client.launcher import free_port
    from tests.test_observability import scrape, total
    from trellis_client import Client

    metrics = free_port()
    router = start_router([w.address for w in two_workers], logs, name="router-run-home",
                          extra=["--metrics-port", str(metrics)])
    try:
        router.wait_serving(timeout=60)
        with Client(router.address) as client:
            client.run("budget_majority_vote", "Hi", params={"n": 4, "parallel": 1, "criterion": "decided"},
                       sampling={"max_tokens": 2, "temperature": 1.0, "seed": 3}, raw=True)
        samples = scrape(metrics)
    finally:
        router.stop()
    picked = total(samples, "trellis_router_routing_decisions_total")
    assert picked >= 3 and total(samples, "trellis_router_routing_decisions_total", policy="run") == picked - 1
