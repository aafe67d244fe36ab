"""A run as a stream of RunEvents: started, the controller's events and token deltas as they happen (merged
per branch when the client reads slower than they come), then the result."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from router.convert import dict_to_struct
from router.runs import PreparedRun, Runs
from trellis_rpc.streams import coalesce, drained
from trellis_rpc.v1 import router_pb2

_DONE = object()


def coalesce_events(events: list[router_pb2.RunEvent]) -> list[router_pb2.RunEvent]:
    """Events that queued up while the client was being written to, with each branch's token deltas
    merged into one message (text joined, counts summed). Other events keep their place: deltas before
    an event are sent before it."""
    return coalesce(events, _branch_key, _merge_delta)


def _branch_key(event: router_pb2.RunEvent) -> str | None:
    return event.delta.branch if event.WhichOneof("event") == "delta" else None


def _merge_delta(into: router_pb2.RunEvent, new: router_pb2.RunEvent) -> None:
    into.delta.text += new.delta.text
    into.delta.token_count += new.delta.token_count
    into.elapsed_ms = new.elapsed_ms


def run_event(run: PreparedRun, **fields) -> router_pb2.RunEvent:
    return router_pb2.RunEvent(run_id=run.run_id, elapsed_ms=(time.monotonic() - run.accepted) * 1000, **fields)


async def run_events(runs: Runs, run: PreparedRun, deadline: float | None) -> AsyncIterator[router_pb2.RunEvent]:
    """started, then controller events as they happen, then the result. Raises StatusError on failure;
    closing the iterator early cancels the run and every worker task under it."""
    queue: asyncio.Queue = asyncio.Queue()
    yield run_event(run, started=router_pb2.RunStarted(
        controller=run.controller.name, params=dict_to_struct(run.controller.param_values())))
    task = asyncio.create_task(runs.execute(run, deadline, lambda fields: queue.put_nowait(run_event(run, **fields))))
    task.add_done_callback(lambda _t: queue.put_nowait(_DONE))
    try:
        async for batch, _last in drained(queue, _DONE):
            for event in coalesce_events(batch):
                yield event
        yield run_event(run, result=task.result())
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        runs.release(run)  # also when the task was cancelled before it started
