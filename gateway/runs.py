"""A request's runs against the router, and their events as Server-Sent Events in OpenAI's stream format.

Streams: every choice's run is opened first and its first event awaited, so a refusal (bad parameter, router
full, no worker) still becomes an HTTP error status; after the 200 has gone out, an error travels as
`data: {"error": ...}`, which the OpenAI SDKs raise. A client that goes away cancels every run of its request.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from gateway import openai_response as shape_of
from gateway.errors import APIError, from_trellis
from gateway.openai_request import Choices
from gateway.run_plan import RunPlan
from trellis_client import AsyncClient, AsyncEventStream, Delta, Event, Final, Result, TrellisError

# Controllers whose one branch's text is the result: their tokens stream as content while generated. Others
# choose their text at the end (a vote, a search), so the chosen text arrives as content when it is chosen,
# and what happens before travels in the chunks' `trellis` field.
LIVE_CONTENT = frozenset({"native_generation"})
PING_SECONDS = 15.0        # an SSE comment on a quiet stream keeps proxies from closing it and finds dead clients
_END, _GONE, _PING = object(), object(), object()


def encode(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"


@dataclass
class Opened:
    index: int
    stream: AsyncEventStream
    first: Event | None


def _run_args(plan: RunPlan, choices: Choices) -> dict[str, Any]:
    return {"params": plan.params, "sampling": choices.sampling, "model": plan.model, "priority": plan.priority,
            "raw": choices.raw}


def _each(choices: Choices) -> list[Any]:
    """Choice i's prompt: OpenAI orders choices prompt by prompt, n per prompt."""
    return [p for p in choices.prompts for _ in range(choices.n)]


async def run_all(client: AsyncClient, plan: RunPlan, choices: Choices, token: str,
                  deadline: float | None) -> list[Result]:
    runs = [asyncio.ensure_future(client.run(plan.controller, p, token=token, deadline=deadline,
                                             **_run_args(plan, choices))) for p in _each(choices)]
    try:
        return list(await asyncio.gather(*runs))
    except TrellisError as err:
        for run in runs:      # one choice failed: the request has, so the others stop spending
            run.cancel()
        raise from_trellis(err, choices.prompt_param, plan.requested) from None


async def open_streams(client: AsyncClient, plan: RunPlan, choices: Choices, token: str,
                       deadline: float | None) -> list[Opened]:
    streams = [client.stream(plan.controller, p, token=token, deadline=deadline, stream_tokens=True,
                             **_run_args(plan, choices)) for p in _each(choices)]

    async def first(stream: AsyncEventStream) -> Event | None:
        return await anext(stream, None)

    try:
        firsts = await asyncio.gather(*(first(s) for s in streams))
    except BaseException as err:
        for s in streams:
            s.cancel()
        if isinstance(err, TrellisError):
            raise from_trellis(err, choices.prompt_param, plan.requested) from None
        raise
    return [Opened(i, s, f) for i, (s, f) in enumerate(zip(streams, firsts, strict=True))]


async def sse(shape: shape_of.Shape, opened: list[Opened], plan: RunPlan, choices: Choices,
              disconnected: Callable[[], Awaitable[None]], on_chunk: Callable[[int], None]) -> AsyncIterator[bytes]:
    """The body of a streamed response, ending in `data: [DONE]`."""
    live = plan.controller in LIVE_CONTENT
    frames = [shape_of.content_frame(shape, o.index) for o in opened]
    streamed = [""] * len(opened)
    results: list[Result | None] = [None] * len(opened)
    chunks = 0
    # One choice whose events flow (the common request): read its stream directly. Several choices, or a run
    # that may stay quiet for long (events off), go through a queue that merges them and pings while quiet.
    merged = len(opened) > 1 or not plan.events
    items = _merged(opened, disconnected) if merged else _single(opened[0])
    try:
        if shape.chat:
            for o in opened:
                yield encode(shape_of.chunk(shape, o.index, "", role=True))
        async for index, item in items:
            if item is _PING:
                yield b": ping\n\n"
            elif item is _END:
                if results[index] is None:
                    yield encode(APIError(502, "the run's stream ended without a result", "server_error").body())
                    return
            elif isinstance(item, TrellisError):
                yield encode(from_trellis(item, choices.prompt_param, plan.requested).body())
                return
            elif isinstance(item, Delta) and live:
                if item.text:
                    streamed[index] += item.text
                    head, tail = frames[index]
                    yield head + json.dumps(item.text, ensure_ascii=False).encode() + tail
                    chunks += 1
            else:
                for obj in _chunks(shape, index, item, plan.events, streamed, results):
                    yield encode(obj)
                    chunks += 1
        if choices.include_usage:
            yield encode(shape_of.usage_chunk(shape, [r for r in results if r is not None]))
        yield DONE
    finally:
        on_chunk(chunks)
        await items.aclose()
        for o in opened:
            o.stream.cancel()


async def _single(o: Opened) -> AsyncIterator[tuple[int, Any]]:
    try:
        if o.first is not None:
            yield o.index, o.first
        async for event in o.stream:
            yield o.index, event
    except TrellisError as err:
        yield o.index, err
    yield o.index, _END


async def _merged(opened: list[Opened], disconnected: Callable[[], Awaitable[None]]) -> AsyncIterator[tuple[int, Any]]:
    """Every choice's events as they come, a ping after PING_SECONDS of quiet; ends when all have ended or the
    client has gone (a quiet stream writes nothing, so the server alone might not notice)."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(o: Opened) -> None:
        async for item in _single(o):
            queue.put_nowait(item)

    async def watch() -> None:
        await disconnected()
        queue.put_nowait((-1, _GONE))

    tasks = [asyncio.create_task(pump(o)) for o in opened] + [asyncio.create_task(watch())]
    pending = len(opened)
    try:
        while pending:
            try:
                index, item = await asyncio.wait_for(queue.get(), PING_SECONDS)
            except TimeoutError:
                yield -1, _PING
                continue
            if item is _GONE:
                return
            pending -= item is _END
            yield index, item
    finally:
        for task in tasks:
            task.cancel()


def _chunks(shape: shape_of.Shape, index: int, event: Event, events: bool, streamed: list[str],
            results: list[Result | None]) -> list[dict[str, Any]]:
    if isinstance(event, Final):
        result = results[index] = event.result
        out = []
        # live: the deltas already were the text (the rest, if the router's final text has more); otherwise the
        # chosen text arrives now
        rest = result.text[len(streamed[index]):] if result.text.startswith(streamed[index]) else ""
        if rest:
            out.append(shape_of.chunk(shape, index, rest))
        out.append(shape_of.chunk(shape, index, None if shape.chat else "", finish=shape_of.finish_reason(result),
                                  trellis={"type": "result", **shape_of.run_summary(result)}))
        return out
    fields = shape_of.event_fields(event) if events else None
    return [shape_of.chunk(shape, index, None if shape.chat else "", trellis=fields)] if fields else []
