"""worker_openai's wait queue in front of its upstream slots (issue 20): with --max-queued a task that does not fit
waits for all n of its slots at once, and waiting tasks start in the --scheduling order (fcfs: arrival; run_las:
priority, then the lower service level of the run, then arrival, with an anti-starvation bound). In process, over
an httpx MockTransport upstream that records which prompt reached it when, and holds a prompt's stream open until
the test lets it go."""

from __future__ import annotations

import asyncio
import json

import grpc
import httpx
import pytest

from trellis_rpc.errors import StatusError
from trellis_rpc.sampling import SamplingConfig
from worker_openai.engine import OpenAIEngine
from worker_openai.sampling_fields import KINDS
from worker_openai.upstream import Upstream, UpstreamConfig
from worker_runtime.engine_api import Finished, PromptInput, RunInfo

EVENTS = ("data: " + json.dumps({"choices": [{"index": 0, "text": "ok", "finish_reason": "stop"}]}) + "\n\n"
          "data: [DONE]\n\n").encode()


class MockUpstream:
    """Records each request's prompt in arrival order; a prompt in `held` streams nothing until released."""

    def __init__(self, held: set[str] = frozenset()) -> None:
        self.reached: list[str] = []
        self.gates = {prompt: asyncio.Event() for prompt in held}

    def release(self, prompt: str) -> None:
        self.gates[prompt].set()

    async def handle(self, request: httpx.Request) -> httpx.Response:
        prompt = json.loads(request.content)["prompt"]
        self.reached.append(prompt)
        gate = self.gates.get(prompt)

        async def stream():
            if gate is not None:
                await gate.wait()
            yield EVENTS

        return httpx.Response(200, content=stream(), headers={"content-type": "text/event-stream"})


def engine_over(mock: MockUpstream, **kw) -> OpenAIEngine:
    upstream = Upstream(UpstreamConfig(base_url="http://upstream.test/v1", retries=0))
    upstream.client = httpx.AsyncClient(base_url="http://upstream.test/v1/",
                                        transport=httpx.MockTransport(mock.handle))
    return OpenAIEngine(upstream, KINDS["vllm"], "m", **kw)


async def finish(engine: OpenAIEngine, prompt: str, n: int = 1, run: RunInfo | None = None) -> Finished:
    async for event in engine.generate(prompt, PromptInput(text=prompt), SamplingConfig(n=n, max_tokens=4), run=run):
        if isinstance(event, Finished):
            return event
    raise AssertionError("no Finished")


async def until(check, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.005)


async def submit(engine: OpenAIEngine, mock: MockUpstream, tasks: list[tuple[str, int, RunInfo | None]],
                 holder: tuple[str, int] = ("hold", 1)) -> tuple[asyncio.Task, dict[str, asyncio.Task]]:
    """Start the holder (its stream held open) and then queue `tasks` one by one, in this order."""
    held = asyncio.create_task(finish(engine, holder[0], holder[1]))
    await until(lambda: mock.reached.count(holder[0]) == holder[1])
    queued = {}
    for prompt, n, run in tasks:
        depth = engine.load().queue_depth
        queued[prompt] = asyncio.create_task(finish(engine, prompt, n, run))
        await until(lambda d=depth, p=prompt: engine.load().queue_depth == d + 1 or mock.reached[-1:] == [p])
    return held, queued


async def submit_more(engine: OpenAIEngine, tasks: list[tuple[str, int, RunInfo | None]]) -> dict[str, asyncio.Task]:
    """Queue more tasks behind those waiting."""
    queued = {}
    for prompt, n, run in tasks:
        depth = engine.load().queue_depth
        queued[prompt] = asyncio.create_task(finish(engine, prompt, n, run))
        await until(lambda d=depth: engine.load().queue_depth == d + 1)
    return queued


LONG_A, FRESH_A, VIP, LONG_B, FRESH_B = "long-a", "fresh-a", "vip", "long-b", "fresh-b"
RUNS = [(LONG_A, 1, RunInfo("long", tokens=5000, tasks_done=20)),
        (FRESH_A, 1, RunInfo("fresh-1", tokens=0)),
        (VIP, 1, RunInfo("vip", priority=2, tokens=5000)),
        (LONG_B, 1, RunInfo("long", tokens=5000, tasks_done=21)),
        (FRESH_B, 1, RunInfo("fresh-2", tokens=0))]


@pytest.mark.parametrize(("policy", "order"), [
    ("fcfs", [LONG_A, FRESH_A, VIP, LONG_B, FRESH_B]),                  # arrival
    ("run_las", [VIP, FRESH_A, FRESH_B, LONG_A, LONG_B]),               # priority, then service level, then arrival
])
def test_waiting_tasks_reach_the_upstream_in_the_policys_order(policy, order):
    async def go():
        mock = MockUpstream(held={"hold"})
        engine = engine_over(mock, max_concurrency=1, max_queued=8, scheduling=policy)
        assert engine.info.scheduling == policy
        held, queued = await submit(engine, mock, RUNS)
        await asyncio.sleep(0.02)
        assert mock.reached == ["hold"]
        load = engine.load()
        assert (load.queue_depth, load.waiting_runs, load.running_sequences) == (5, 4, 1)
        mock.release("hold")
        done = await asyncio.gather(held, *queued.values())
        assert mock.reached == ["hold", *order]
        assert done[0].queue_ms == 0.0
        assert all(d.queue_ms >= 20.0 for d in done[1:])        # they waited at least the 20 ms above
        assert all(c.finish_reason == "stop" for d in done for c in d.completions)
        assert (engine.load().queue_depth, engine.load().running_sequences) == (0, 0)
    asyncio.run(go())


@pytest.mark.parametrize("policy", ["fcfs", "run_las"])
def test_a_gang_waits_for_all_its_slots_and_nothing_of_no_better_rank_overtakes_it(policy):
    """Two slots, one held: the n=2 task at the head waits; the n=1 task behind it would fit but waits too."""
    async def go():
        mock = MockUpstream(held={"hold"})
        engine = engine_over(mock, max_concurrency=2, max_queued=8, scheduling=policy)
        held, queued = await submit(engine, mock, [("gang", 2, RunInfo("a")), ("single", 1, RunInfo("b"))])
        await asyncio.sleep(0.02)
        assert mock.reached == ["hold"] and engine.load().queue_depth == 2 and engine.in_flight == 1
        mock.release("hold")
        done = await asyncio.gather(held, *queued.values())
        assert mock.reached == ["hold", "gang", "gang", "single"]
        assert len(done[1].completions) == 2 and done[1].queue_ms > 0
    asyncio.run(go())


def test_under_run_las_a_better_ranked_task_that_fits_goes_past_a_waiting_gang():
    async def go():
        mock = MockUpstream(held={"hold"})
        engine = engine_over(mock, max_concurrency=2, max_queued=8, scheduling="run_las")
        held, queued = await submit(engine, mock, [("gang", 2, RunInfo("long", tokens=5000)),
                                                   ("fresh", 1, RunInfo("fresh", tokens=0))])
        await until(lambda: "fresh" in mock.reached)
        assert mock.reached == ["hold", "fresh"] and engine.load().queue_depth == 1
        mock.release("hold")
        await asyncio.gather(held, *queued.values())
        assert mock.reached == ["hold", "fresh", "gang", "gang"]
    asyncio.run(go())


def test_a_task_waiting_past_the_starvation_bound_goes_first():
    async def go():
        mock = MockUpstream(held={"hold"})
        engine = engine_over(mock, max_concurrency=1, max_queued=8, scheduling="run_las", starvation_s=0.05)
        held, queued = await submit(engine, mock, [("old", 1, RunInfo("long", tokens=10**6))])
        await asyncio.sleep(0.1)
        later = await submit_more(engine, [("high", 1, RunInfo("vip", priority=3)),
                                              ("fresh", 1, RunInfo("fresh"))])
        mock.release("hold")
        await asyncio.gather(held, *queued.values(), *later.values())
        assert mock.reached == ["hold", "old", "high", "fresh"]
    asyncio.run(go())


def test_without_max_queued_a_task_that_does_not_fit_is_refused_at_once():
    async def go():
        mock = MockUpstream(held={"hold"})
        engine = engine_over(mock, max_concurrency=1)
        held, _ = await submit(engine, mock, [])
        with pytest.raises(StatusError) as err:
            await finish(engine, "refused")
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "1 of its 1 upstream requests in flight; the task needs 1" in err.value.message
        mock.release("hold")
        await held
        assert mock.reached == ["hold"]
    asyncio.run(go())


def test_a_full_queue_refuses_with_resource_exhausted():
    async def go():
        mock = MockUpstream(held={"hold"})
        engine = engine_over(mock, max_concurrency=1, max_queued=2, scheduling="run_las")
        held, queued = await submit(engine, mock, [("a", 1, RunInfo("a")), ("b", 1, RunInfo("b"))])
        with pytest.raises(StatusError) as err:
            await finish(engine, "c", run=RunInfo("c", priority=5))
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "slots and queue are full" in err.value.message and "2 of its 2 tasks waiting" in err.value.message
        with pytest.raises(StatusError) as err:     # more samples than there are slots can never start
            await finish(engine, "wide", n=2)
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        mock.release("hold")
        await asyncio.gather(held, *queued.values())
        assert mock.reached == ["hold", "a", "b"]
    asyncio.run(go())


@pytest.mark.parametrize("policy", ["fcfs", "run_las"])
def test_a_cancelled_waiting_task_leaves_the_queue_and_never_reaches_the_upstream(policy):
    async def go():
        mock = MockUpstream(held={"hold"})
        engine = engine_over(mock, max_concurrency=1, max_queued=8, scheduling=policy)
        held, queued = await submit(engine, mock, [("by-cancel", 1, RunInfo("a")), ("by-consumer", 1, RunInfo("b")),
                                                   ("kept", 1, RunInfo("c"))])
        engine.cancel("by-cancel")                 # the router's cancel, or a deadline
        cancelled = await queued["by-cancel"]
        assert [c.finish_reason for c in cancelled.completions] == ["cancelled"] and cancelled.queue_ms > 0
        queued["by-consumer"].cancel()             # the stream went away
        with pytest.raises(asyncio.CancelledError):
            await queued["by-consumer"]
        assert (engine.load().queue_depth, engine.load().waiting_runs, engine.in_flight) == (1, 1, 1)
        mock.release("hold")
        await asyncio.gather(held, queued["kept"])
        assert mock.reached == ["hold", "kept"]
        assert (engine.load().queue_depth, engine.in_flight) == (0, 0)
    asyncio.run(go())
