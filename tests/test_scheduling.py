"""Program-aware scheduling (torch_engine/scheduler.py) on scripted sequences: least attained service across
runs, priorities first, the anti-starvation bound, gang admission of a task's n samples, and fcfs as the off
switch giving arrival order. Plus the run's identity and consumption reaching the worker from a real router."""

from __future__ import annotations

import time

import pytest

from torch_engine.block_manager import BlockManager
from torch_engine.scheduler import Scheduler
from torch_engine.sequence import Request, Sequence
from trellis_rpc.sampling import SamplingConfig
from worker_runtime.engine_api import RunInfo


def seq(task: str, run: RunInfo | None, prompt: int = 8, n: int = 1, submitted: float | None = None) -> Sequence:
    request = Request(task_id=task, prompt_ids=list(range(prompt)), cfg=SamplingConfig(n=n), emit=lambda e: None,
                      submitted=time.perf_counter() if submitted is None else submitted, run=run)
    s = Sequence(request=request, index=0, token_ids=list(range(prompt)), num_prompt=prompt, detok=None, stops=None,
                 generator=None)
    request.sequences.append(s)
    return s


def scheduler(policy: str, rows: int = 1, starvation_s: float = 10.0) -> Scheduler:
    """Room for `rows` sequences a step, so the order of admission is the order of the schedule."""
    return Scheduler(BlockManager(64, 16), max_num_tokens=512, max_batch_size=rows, policy=policy,
                     starvation_s=starvation_s)


def admitted_order(sched: Scheduler) -> list[str]:
    order = []
    while sched.waiting:
        plan = sched.schedule()
        for item in plan.items:
            if item.seq.request.task_id not in order:
                order.append(item.seq.request.task_id)
        for s in list(sched.running):
            sched.finish(s)
    return order


def test_least_attained_service_across_runs_then_arrival():
    sched = scheduler("run_las")
    long_run = RunInfo("mcts", tokens=5000, tasks_done=99)
    sched.add(seq("mcts/99", long_run))             # arrived first: a long program's hundredth call
    sched.add(seq("vote/0", RunInfo("vote", tokens=0)))
    sched.add(seq("chat/0", RunInfo("chat", tokens=700)))
    sched.add(seq("vote2/0", RunInfo("vote2", tokens=0)))
    assert admitted_order(sched) == ["vote/0", "vote2/0", "chat/0", "mcts/99"]


def test_runs_of_one_service_level_go_in_arrival_order():
    """Service counts in doubling levels (below 512 tokens, below 1024, ...), so similar short runs do not
    overtake each other step after step; within a level, arrival decides."""
    sched = scheduler("run_las")
    sched.add(seq("a/0", RunInfo("a", tokens=400)))
    sched.add(seq("b/0", RunInfo("b", tokens=0)))
    sched.add(seq("c/0", RunInfo("c", tokens=1100)))
    sched.add(seq("d/0", RunInfo("d", tokens=600)))
    assert admitted_order(sched) == ["a/0", "b/0", "d/0", "c/0"]


def test_service_computed_here_counts_too():
    sched = scheduler("run_las")
    a, b = RunInfo("a", tokens=400), RunInfo("b", tokens=500)
    sched.account(seq("a/0", a), 150)            # this worker already computed 150 tokens of run a since
    sched.add(seq("a/1", a))
    sched.add(seq("b/1", b))
    assert admitted_order(sched) == ["b/1", "a/1"]


def test_priority_classes_come_first():
    sched = scheduler("run_las")
    sched.add(seq("low/0", RunInfo("low", priority=0, tokens=0)))
    sched.add(seq("high/5", RunInfo("high", priority=5, tokens=10_000)))
    assert admitted_order(sched) == ["high/5", "low/0"]


def test_a_task_waiting_past_the_bound_goes_first_whatever_its_run():
    sched = scheduler("run_las", starvation_s=0.5)
    now = time.perf_counter()
    sched.add(seq("fresh/0", RunInfo("fresh", tokens=0), submitted=now))
    sched.add(seq("starved/7", RunInfo("long", tokens=10**6), submitted=now - 1.0))
    sched.add(seq("high/0", RunInfo("high", priority=9, tokens=0), submitted=now))
    assert admitted_order(sched) == ["starved/7", "high/0", "fresh/0"]


def test_fcfs_is_the_off_switch_arrival_order():
    sched = scheduler("fcfs")
    for task, tokens, priority in (("mcts/99", 5000, 0), ("vote/0", 0, 0), ("high/0", 0, 9)):
        sched.add(seq(task, RunInfo(task.split("/")[0], priority=priority, tokens=tokens)))
    assert admitted_order(sched) == ["mcts/99", "vote/0", "high/0"]


def test_the_n_samples_of_a_task_are_admitted_together_or_not_at_all():
    """A task of n samples reserves its n rows when admitted: with room for 4 rows and 3 taken, an n=4 task waits
    rather than starting part of its samples; a smaller task behind it under run_las does not overtake rows it
    reserved (it is still the least-served run)."""
    sched = Scheduler(BlockManager(64, 16), max_num_tokens=512, max_batch_size=4, policy="run_las")
    busy = [seq(f"busy/{i}", RunInfo("busy", tokens=0)) for i in range(3)]
    for s in busy:
        sched.add(s)
    sched.schedule()
    assert len(sched.running) == 3
    gang = seq("gang/0", RunInfo("gang", tokens=0), n=4)
    sched.add(gang)
    plan = sched.schedule()
    assert gang not in [item.seq for item in plan.items] and gang in sched.waiting
    for s in busy:
        sched.finish(s)
    plan = sched.schedule()
    assert [item.seq for item in plan.items] == [gang]     # all four rows at once, when there is room for four


def test_a_fresh_run_takes_a_long_program_s_row_and_the_program_keeps_its_blocks():
    """Rows are re-decided every step: a long program decoding in the only row is paused (not preempted: its
    blocks and progress stay) while a fresh short run takes the row, and resumes where it was."""
    sched = scheduler("run_las", rows=1)
    long_seq = seq("mcts/99", RunInfo("mcts", tokens=5000))
    sched.add(long_seq)
    plan = sched.schedule()
    long_seq.computed += plan.items[0].tokens
    blocks = list(long_seq.table.blocks)
    short = seq("chat/0", RunInfo("chat", tokens=0))
    sched.add(short)
    plan = sched.schedule()
    assert [item.seq for item in plan.items] == [short] and plan.paused == 1
    assert long_seq.table.blocks == blocks and long_seq.computed == 8 and long_seq in sched.running
    sched.finish(short)
    plan = sched.schedule()
    assert [item.seq for item in plan.items] == [long_seq] and plan.paused == 0


def test_a_paused_request_is_starved_for_no_longer_than_the_bound():
    sched = scheduler("run_las", rows=1, starvation_s=0.2)
    long_seq = seq("mcts/99", RunInfo("mcts", tokens=5000))
    sched.add(long_seq)
    sched.schedule()
    sched.add(seq("chat/0", RunInfo("chat", tokens=0)))
    assert [item.seq.request.task_id for item in sched.schedule().items] == ["chat/0"]
    time.sleep(0.25)
    assert [item.seq.request.task_id for item in sched.schedule().items] == ["mcts/99"]


def test_under_block_pressure_the_lowest_ranked_paused_sequence_gives_its_blocks_back():
    """4 blocks of 16 tokens: a long program holds 2, a fresh run needs 3; the paused program is preempted (its
    blocks freed, queued again to recompute) rather than the fresh run waiting."""
    sched = Scheduler(BlockManager(4, 16), max_num_tokens=512, max_batch_size=1, policy="run_las")
    long_seq = seq("mcts/99", RunInfo("mcts", tokens=5000), prompt=20)
    sched.add(long_seq)
    sched.schedule()
    long_seq.computed = 20
    fresh = seq("chat/0", RunInfo("chat", tokens=0), prompt=40)
    sched.add(fresh)
    plan = sched.schedule()
    assert [item.seq for item in plan.items] == [fresh] and plan.preempted == 1
    assert long_seq in sched.waiting and long_seq.computed == 0 and not long_seq.table.blocks


def test_an_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="fcfs, run_las"):
        scheduler("lottery")


def test_a_decided_vote_stops_its_other_samples_through_real_processes(client_stack):
    """The worker marks each sample's last delta, the router passes it on, and majority_vote stops once its leader
    cannot be overtaken. Greedy samples are all the same text, so three of five decide it."""
    from trellis_client import Client

    params = {"n": 5, "extractor": "last_number"}
    sampling = {"temperature": 0, "max_tokens": 8, "ignore_eos": True}   # the tiny model continues "1 2 3" with 3s
    with Client(client_stack["router"].address) as client:
        early = client.run("majority_vote", "1 2 3", params=params, sampling=sampling, raw=True)
        full = client.run("majority_vote", "1 2 3", params={**params, "stop_decided": False}, sampling=sampling,
                          raw=True)
    assert early.answer == full.answer == "3"
    assert full.details["counted"] == 5 and early.details["counted"] == 3
    # A task its controller stopped still spent what it streamed.
    assert 0 < early.usage.completion_tokens <= full.usage.completion_tokens == 40


def test_the_worker_s_metrics_say_its_policy(client_stack):
    """Queue time is labelled with the scheduling policy, so a dashboard compares policies; paused sequences and
    waiting runs are gauges."""
    from tests.test_observability import scrape, total
    from trellis_client import Client

    with Client(client_stack["router"].address) as client:
        client.run("native_generation", "hi", sampling={"max_tokens": 2})
    samples = scrape(client_stack["worker_metrics"])
    assert total(samples, "trellis_worker_queue_duration_seconds_count", kind="generate", scheduling="fcfs") >= 1
    names = {name for name, _ in samples}
    assert {"trellis_worker_paused_sequences", "trellis_worker_waiting_runs"} <= names


def test_one_number_per_request_keeps_the_run_order_for_engines_that_take_a_priority():
    """TensorRT-LLM schedules by a request priority in [0, 1]: classes stay apart, and within a class a run with
    less attained service is higher; a task without a run gets TensorRT-LLM's default 0.5."""
    from worker_runtime.run_order import bounded_priority

    order = [RunInfo("hi-long", priority=1, tokens=10**9), RunInfo("fresh", tokens=0), RunInfo("mid", tokens=5000),
             RunInfo("long", tokens=10**9), RunInfo("lo-fresh", priority=-1, tokens=0)]
    values = [bounded_priority(run) for run in order]
    assert values == sorted(values, reverse=True) and len(set(values)) == len(values)
    assert all(0.0 <= v <= 1.0 for v in values + [bounded_priority(RunInfo("x", priority=99)),
                                                   bounded_priority(RunInfo("x", priority=-99))])
    assert bounded_priority(None) == 0.5


def test_the_router_offers_reallocation_only_when_configured_and_says_when_it_is_short():
    """--reallocate certaindex: every run's controller gets the offer, whose under_load() is true while runs wait for
    admission (or tasks wait at workers); off, the default: no offer, so only the exact stop applies."""
    from router.admission import Admission
    from router.cli import parse_args
    from router.pool import WorkerPool
    from router.service import RouterService
    from tests.helpers import chat
    from trellis_rpc.v1 import router_pb2

    args = parse_args(["--workers", "127.0.0.1:1", "--reallocate", "certaindex", "--certainty", "0.9"])
    assert (args.reallocate, args.certainty) == ("certaindex", 0.9)
    assert parse_args(["--workers", "127.0.0.1:1"]).reallocate == "off"

    request = router_pb2.RunRequest(controller="majority_vote", prompt=chat("2+2?"))
    assert RouterService(WorkerPool([])).runs.prepare(request).controller.reallocation is None
    service = RouterService(WorkerPool([]), admission=Admission(max_running=1), certainty=0.9)
    first = service.runs.prepare(request)
    offer = first.controller.reallocation
    assert offer is not None and offer.certainty == 0.9 and not offer.under_load()
    service.runs.prepare(request)                # waits for admission: the router is short of capacity
    assert offer.under_load()


def test_the_engine_says_when_it_serves_a_better_ranked_run_than_a_score_task_s():
    sched = scheduler("run_las", rows=4)
    short = seq("chat/0", RunInfo("chat", tokens=0))
    sched.add(short)
    sched.schedule()
    assert sched.outranks(RunInfo("mcts", tokens=5000))
    assert not sched.outranks(RunInfo("other", tokens=100))                 # the same level
    assert not sched.outranks(RunInfo("urgent", priority=1, tokens=10**6))  # a better class
    sched.finish(short)
    sched.schedule()
    assert not sched.outranks(RunInfo("mcts", tokens=5000))                 # nothing served


def test_a_prefill_ranked_below_a_decoding_run_advances_in_small_chunks():
    """A step's time grows with its tokens: while a better-ranked run decodes, a long program's prefill gets
    BELOW_RANK_PREFILL tokens a step, not the whole step budget; alone, it is the step's best and takes it all."""
    from torch_engine.scheduler import BELOW_RANK_PREFILL

    sched = Scheduler(BlockManager(256, 16), max_num_tokens=512, max_batch_size=8, policy="run_las")
    short = seq("chat/0", RunInfo("chat", tokens=0))
    sched.add(short)
    sched.schedule()
    short.computed = 8
    short.token_ids.append(5)                 # it sampled its first token: it decodes now
    long_seq = seq("mcts/9", RunInfo("mcts", tokens=5000), prompt=300)
    sched.add(long_seq)
    plan = sched.schedule()
    assert {item.seq.request.task_id: item.tokens for item in plan.items} == {"chat/0": 1, "mcts/9": BELOW_RANK_PREFILL}
    long_seq.computed += BELOW_RANK_PREFILL
    sched.finish(short)
    plan = sched.schedule()
    assert [(item.seq, item.tokens) for item in plan.items] == [(long_seq, 300 - BELOW_RANK_PREFILL)]


@pytest.mark.processes
def test_under_load_a_router_offering_certaindex_stops_a_vote_once_certain(tiny_model, logs):
    """A worker with room for 4 rows and three votes of 8 samples at once: tasks wait at the worker, so the router
    is short of capacity, and a vote whose first four samples agree stops there (Beta criterion 31/32 >= 0.95),
    before the exact stop at five. Greedy samples all give the same answer."""
    import concurrent.futures

    from client.launcher import start_router, start_worker
    from trellis_client import Client

    worker = start_worker(str(tiny_model), logs, name="certaindex-worker",
                          extra=["--threads", "1", "--max-batch-size", "8"])
    router = None
    try:
        worker.wait_serving(timeout=120)
        router = start_router([worker.address], logs, name="certaindex-router",
                              extra=["--reallocate", "certaindex", "--certainty", "0.95"])
        router.wait_serving(timeout=60)
        with Client(router.address) as client:
            def vote(_):
                return client.run("majority_vote", "1 2 3", params={"n": 8, "extractor": "last_number"}, raw=True,
                                  sampling={"temperature": 0, "max_tokens": 24, "ignore_eos": True})
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                results = list(pool.map(vote, range(4)))
    finally:
        for proc in (router, worker):
            if proc is not None:
                proc.stop()
    assert all(r.answer == "3" for r in results)
    assert any(r.details["stopped"] == "certain" and r.details["counted"] == 4 for r in results), \
        [r.details for r in results]


def test_long_programs_of_similar_size_do_not_throttle_each_other():
    """The prefill cap and the verifier's hold shield a run only from runs a class below it or two service levels
    (4x the tokens) above it: two long programs one level apart share the step as fcfs would let them."""
    sched = Scheduler(BlockManager(256, 16), max_num_tokens=512, max_batch_size=8, policy="run_las")
    first = seq("mcts/1", RunInfo("mcts", tokens=1100))            # level 2
    sched.add(first)
    sched.schedule()
    first.computed = 8
    first.token_ids.append(5)
    other = seq("beam/1", RunInfo("beam", tokens=3000), prompt=300)   # level 3
    sched.add(other)
    plan = sched.schedule()
    assert {item.seq.request.task_id: item.tokens for item in plan.items} == {"mcts/1": 1, "beam/1": 300}
    assert not sched.outranks(RunInfo("beam", tokens=3000)) and sched.outranks(RunInfo("huge", tokens=5000))
