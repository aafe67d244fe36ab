"""Writing a stream that can fall behind: drain what queued up while the last write was in flight, and
merge the token deltas in it. The router (run events to a client) and the worker (task responses to a
router) both write such streams; one message per token costs a reader ~100 us, so under backlog fewer,
larger messages let it catch up."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Hashable
from typing import TypeVar

T = TypeVar("T")


async def drained(queue: asyncio.Queue, end: object) -> AsyncIterator[tuple[list, bool]]:
    """(batch, last): every item waiting in `queue` (at least one), until the batch that held `end`, which
    comes last and without it."""
    while True:
        batch = [await queue.get()]
        while not queue.empty():
            batch.append(queue.get_nowait())
        if batch[-1] is end:
            yield batch[:-1], True
            return
        yield batch, False


def coalesce(items: list[T], key: Callable[[T], Hashable | None], merge: Callable[[T, T], None]) -> list[T]:
    """Items with the deltas of each key merged into the first of them (`merge(into, new)`), in order: an
    item whose key is None (not a delta) is a barrier, so what came before it is sent before it."""
    if len(items) < 2:
        return items
    out: list[T] = []
    pending: dict[Hashable, T] = {}
    for item in items:
        k = key(item)
        if k is None:
            out.extend(pending.values())
            pending.clear()
            out.append(item)
        elif k in pending:
            merge(pending[k], item)
        else:
            pending[k] = item
    out.extend(pending.values())
    return out
