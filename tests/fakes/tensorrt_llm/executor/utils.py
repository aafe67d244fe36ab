"""Mirrors tensorrt_llm/executor/utils.py (RequestError, EngineDeadError, has_event_loop) and holds
tensorrt_llm/llmapi/utils.py's AsyncQueue (kept here so that importing the executor package does not
import llmapi/ first; llmapi/utils.py re-exports it): one FIFO with a thread-safe sync end (`sync_q`) and
an asyncio end, so the engine thread can feed a result read either with `result()` or with `async for`.
Waking an event loop goes through `call_soon_threadsafe`."""

from __future__ import annotations

import asyncio
import queue
import threading
from collections import deque
from typing import Any


class RequestError(RuntimeError):
    """The error raised when the request is invalid."""


class EngineDeadError(RuntimeError):
    """The executor died; raised by every pending result."""


def has_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _wake(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


class _SyncQueue:
    def __init__(self, parent: AsyncQueue) -> None:
        self._parent = parent

    def put(self, item: Any) -> None:
        self._parent.put_nowait(item)

    def put_nowait(self, item: Any) -> None:
        self._parent.put_nowait(item)

    def get(self, timeout: float | None = None) -> Any:
        """Blocks up to `timeout` seconds (None: forever); raises queue.Empty, like queue.Queue."""
        p = self._parent
        with p._cv:
            if not p._cv.wait_for(lambda: p._items, timeout=timeout):
                raise queue.Empty
            return p._items.popleft()


class AsyncQueue:
    def __init__(self) -> None:
        self._items: deque[Any] = deque()
        self._cv = threading.Condition()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []
        self.sync_q = _SyncQueue(self)

    def put_nowait(self, item: Any) -> None:
        """Thread-safe; wakes blocked sync readers and any awaiting coroutine on its own loop."""
        with self._cv:
            self._items.append(item)
            waiters, self._waiters = self._waiters, []
            self._cv.notify_all()
        for loop, fut in waiters:
            try:
                loop.call_soon_threadsafe(_wake, fut)
            except RuntimeError:  # that loop is closed: nobody is waiting there any more
                pass

    def __len__(self) -> int:
        with self._cv:
            return len(self._items)

    async def get(self, timeout: float | None = None) -> Any:
        """The next item; asyncio.TimeoutError after `timeout` seconds without one."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            with self._cv:
                if self._items:
                    return self._items.popleft()
                fut = loop.create_future()
                self._waiters.append((loop, fut))
            try:
                if deadline is None:
                    await fut
                else:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        raise TimeoutError
                    await asyncio.wait_for(fut, remaining)
            except BaseException:
                with self._cv:
                    if (loop, fut) in self._waiters:
                        self._waiters.remove((loop, fut))
                raise
