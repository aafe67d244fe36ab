"""The worker contract directly: one Connect stream multiplexing tasks, cancellation, deadlines, load reports."""

from __future__ import annotations

import queue
import time

import grpc

from tests.helpers import chat
from trellis_rpc.v1 import common_pb2, worker_pb2


class Stream:
    """A Connect stream driven from a test: send requests, read responses by kind."""

    def __init__(self, stub: worker_pb2_grpc.WorkerStub, timeout: float = 120) -> None:  # noqa: F821
        self._out: queue.Queue = queue.Queue()
        self._call = stub.Connect(iter(self._out.get, None), timeout=timeout)

    def send(self, req: worker_pb2.WorkerRequest) -> None:
        self._out.put(req)

    def until(self, predicate, limit: int = 10_000, deadline: float | None = None) -> list[worker_pb2.WorkerResponse]:
        """Responses up to the first that satisfies predicate (or limit of them, or the stream's end); past
        deadline (a time.monotonic() value) while reading, fail."""
        seen = []
        for response in self._call:
            seen.append(response)
            if predicate(response) or len(seen) >= limit:
                return seen
            assert deadline is None or time.monotonic() < deadline, \
                f"nothing matched in time; {len(seen)} seen, the last: {str(response)[:300]}"
        return seen

    def close(self) -> None:
        self._out.put(None)
        self._call.cancel()


def generate(task_id: str, stream: bool = True, prompt: common_pb2.Prompt | None = None, timeout_ms: int = 0,
             **sampling) -> worker_pb2.WorkerRequest:
    return worker_pb2.WorkerRequest(task_id=task_id, timeout_ms=timeout_ms, generate=worker_pb2.GenerateTask(
        prompt=prompt or chat("hello"), stream=stream, sampling=common_pb2.SamplingParams(**sampling)))


def ends(task_id: str):
    return lambda r: r.task_id == task_id and r.WhichOneof("kind") in ("generate_result", "error")


def test_info(worker_stub):
    info = worker_stub.Info(worker_pb2.InfoRequest(), timeout=10)
    assert info.engine == "torch-cpu"
    assert info.max_context_tokens == 256
    assert common_pb2.CAPABILITY_GENERATE in info.capabilities
    assert info.worker_id and info.model_id


def test_two_tasks_interleave_on_one_stream(worker_stub):
    s = Stream(worker_stub)
    try:
        s.send(generate("long", max_tokens=240, ignore_eos=True, seed=1))   # most of the 256-token context
        s.send(generate("short", max_tokens=3, ignore_eos=True, seed=2))
        seen = s.until(ends("long"))
        order = [r.task_id for r in seen if r.WhichOneof("kind") == "generate_result"]
        assert order == ["short", "long"], "a short task must not wait behind a long one"
        deltas = [r for r in seen if r.task_id == "short" and r.WhichOneof("kind") == "delta"]
        assert sum(len(d.delta.token_ids) for d in deltas) == 3
    finally:
        s.close()


def test_cancel_frees_the_sequence(worker_stub):
    s = Stream(worker_stub)
    try:
        s.send(generate("c1", max_tokens=250, ignore_eos=True, n=4, seed=1))
        s.until(lambda r: r.task_id == "c1" and r.WhichOneof("kind") == "delta")
        s.send(worker_pb2.WorkerRequest(task_id="x", cancel=worker_pb2.CancelTask(target_task_id="c1")))
        seen = s.until(ends("c1"))
        result = seen[-1].generate_result
        assert all(c.finish_reason == common_pb2.FINISH_REASON_CANCELLED for c in result.completions)
        assert all(len(c.token_ids) < 250 for c in result.completions)
        # Load reports arrive at least every second; the next one shows the sequences and KV released.
        load = s.until(lambda r: r.WhichOneof("kind") == "load", limit=50)[-1].load
        assert load.running_sequences == 0 and load.kv_blocks_used == 0
    finally:
        s.close()


def test_a_load_report_follows_every_finished_task(worker_stub):
    """So the router never routes on a report taken while the task was still running (it would steer the next
    task away from the worker that just cached its prefix)."""
    s = Stream(worker_stub)
    try:
        for task_id in ("after-1", "after-2"):
            s.send(generate(task_id, max_tokens=3, ignore_eos=True))
            seen = s.until(ends(task_id))
            assert seen[-1].WhichOneof("kind") == "generate_result"
            following = s.until(lambda r: True, limit=1)[0]
            assert following.WhichOneof("kind") == "load", following
            assert following.load.running_sequences == 0 and following.load.queue_depth == 0
    finally:
        s.close()


def test_release_drops_what_a_run_kept(worker_stub):
    s = Stream(worker_stub)
    try:
        for task_id in ("run-r.1/0", "run-r.1/1"):
            req = generate(task_id, max_tokens=4, ignore_eos=True, n=2)
            req.generate.keep.keep = True
            req.generate.keep.ttl_ms = 60_000
            s.send(req)
            assert s.until(ends(task_id))[-1].generate_result.sequence_handles
        load = s.until(lambda r: r.WhichOneof("kind") == "load", limit=50)[-1].load
        assert load.kept_sequences == 4 and load.kv_blocks_used > 0
        s.send(worker_pb2.WorkerRequest(release=worker_pb2.ReleaseSequences(task_prefix="run-r.1")))
        # Load reports arrive at least every second: within two, everything the run kept is gone.
        reports = [s.until(lambda r: r.WhichOneof("kind") == "load", limit=50)[-1].load for _ in range(2)]
        assert (reports[-1].kept_sequences, reports[-1].kv_blocks_used) == (0, 0)
    finally:
        s.close()


def test_deadline_on_the_task(worker_stub):
    s = Stream(worker_stub)
    try:
        s.send(generate("d1", max_tokens=250, ignore_eos=True, n=8, timeout_ms=1))
        err = s.until(ends("d1"))[-1]
        assert err.error.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    finally:
        s.close()


def test_bad_tasks_get_errors_and_the_stream_keeps_serving(worker_stub):
    s = Stream(worker_stub)
    try:
        s.send(generate("neg", max_tokens=-1))
        e = s.until(ends("neg"))[-1].error
        assert e.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and e.field == "sampling.max_tokens"
        assert e.reason == ""
        s.send(generate("long-prompt", prompt=common_pb2.Prompt(text="word " * 400)))
        e = s.until(ends("long-prompt"))[-1].error
        assert e.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and e.field == "prompt"
        # The reason tells a controller that built the prompt itself to end the branch, not fail the run.
        assert "context" in e.message and e.reason == "CONTEXT_LENGTH_EXCEEDED"
        s.send(generate("vocab", prompt=common_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=[1, 99999]))))
        e = s.until(ends("vocab"))[-1].error
        assert e.field == "prompt.token_ids.ids"
        s.send(generate("ok", max_tokens=2, ignore_eos=True))
        r = s.until(ends("ok"))[-1]
        assert r.WhichOneof("kind") == "generate_result" and len(r.generate_result.completions[0].token_ids) == 2
    finally:
        s.close()


def test_keep_then_fork_and_continue_over_the_stream(worker_stub):
    s = Stream(worker_stub)
    try:
        req = generate("k1", max_tokens=6, ignore_eos=True, temperature=0.0)
        req.generate.keep.keep = True
        req.generate.keep.ttl_ms = 30_000
        s.send(req)
        kept = s.until(ends("k1"))[-1].generate_result
        handle = kept.sequence_handles[0]
        assert handle.startswith(kept.worker_id + ":")
        fork = generate("f1", prompt=common_pb2.Prompt(text=" more"), max_tokens=4, ignore_eos=True,
                        temperature=0.0, n=2)
        fork.generate.fork_from.handle = handle
        s.send(fork)
        forked = s.until(ends("f1"))[-1].generate_result
        assert [len(c.token_ids) for c in forked.completions] == [4, 4]
        assert forked.completions[0].token_ids == forked.completions[1].token_ids
        assert forked.usage.cached_prompt_tokens >= kept.usage.prompt_tokens
        overflow = generate("f2", prompt=common_pb2.Prompt(text="word " * 400), max_tokens=1)
        overflow.generate.fork_from.handle = handle
        s.send(overflow)
        err = s.until(ends("f2"))[-1].error
        assert (err.field, err.reason) == ("prompt", "CONTEXT_LENGTH_EXCEEDED") and "kept sequence" in err.message
        cont = generate("c1", max_tokens=3, ignore_eos=True, temperature=0.0)
        cont.generate.ClearField("prompt")
        cont.generate.continue_from.handle = handle
        s.send(cont)
        assert len(s.until(ends("c1"))[-1].generate_result.completions[0].token_ids) == 3
        again = generate("c2", prompt=common_pb2.Prompt(text=""), max_tokens=3)
        again.generate.continue_from.handle = handle
        s.send(again)
        err = s.until(ends("c2"))[-1].error
        assert err.code == grpc.StatusCode.NOT_FOUND.value[0] and err.field == "generate.source"
        foreign = generate("c3", prompt=common_pb2.Prompt(text=""), max_tokens=3)
        foreign.generate.fork_from.handle = "some-other-worker:k1/0"
        s.send(foreign)
        err = s.until(ends("c3"))[-1].error
        assert err.code == grpc.StatusCode.NOT_FOUND.value[0] and err.field == "fork_from.handle"
    finally:
        s.close()


def test_router_runner_routes_a_fork_to_the_worker_holding_the_kv(tiny_worker):
    import asyncio

    from controllers import Generate, Prompt
    from router.dispatch import RemoteRunner
    from router.pool import WorkerPool

    async def main():
        pool = WorkerPool([tiny_worker.address])
        pool.start()
        try:
            runner = RemoteRunner(pool, "run-keep", "", common_pb2.SamplingParams(temperature=0.0, ignore_eos=True,
                                                                                  max_tokens=5), worker_wait_s=5.0)
            first = Generate(Prompt(text="hello there"), keep_s=30.0)
            first.output = await runner.generate(first, lambda *a: None)
            handle = first.output.handles[0]
            assert handle.startswith(first.output.worker_id + ":")
            branch = Generate(Prompt(text=" and"), n=2, fork_from=handle)
            out = await runner.generate(branch, lambda *a: None)
            assert out.worker_id == first.output.worker_id
            assert out.cached_prompt_tokens >= first.output.prompt_tokens
            assert len(out.samples) == 2
        finally:
            await pool.close()

    asyncio.run(main())
