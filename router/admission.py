"""Admission control: how many runs the router works on at once, who waits, and who is turned away.

A run first reserves a place (synchronously, before anything is sent to the client): refused with
RESOURCE_EXHAUSTED when its client already has its limit of runs in flight, or when the router is
at `max_running` and `max_queued` runs already wait. Otherwise it runs at once or waits in a
priority queue (higher `priority` first, then arrival order) until a running run ends. Refusals
say when to retry: the median run time so far times the queue ahead, also sent as `retry-after-ms`
trailing metadata.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import itertools
import statistics
import time
from dataclasses import dataclass, field

import grpc

from trellis_rpc.errors import StatusError


class Exhausted(StatusError):
    def __init__(self, message: str, retry_after_ms: int) -> None:
        super().__init__(grpc.StatusCode.RESOURCE_EXHAUSTED, message)
        self.retry_after_ms = retry_after_ms


@dataclass(order=True)
class Ticket:
    sort_key: tuple[int, int]
    client: str = field(compare=False)
    admitted: asyncio.Event = field(compare=False, default_factory=asyncio.Event)
    reserved_at: float = field(compare=False, default_factory=time.monotonic)
    started_at: float | None = field(compare=False, default=None)
    done: bool = field(compare=False, default=False)

    @property
    def waited_ms(self) -> float:
        return ((self.started_at or time.monotonic()) - self.reserved_at) * 1000


class Admission:
    def __init__(self, max_running: int = 0, max_queued: int = 1024, per_client: int = 0) -> None:
        """0 means no limit for max_running and per_client."""
        self.max_running = max_running
        self.max_queued = max_queued
        self.per_client = per_client
        self.running = 0
        self._queue: list[Ticket] = []
        self._arrivals = itertools.count()
        self._by_client: collections.Counter[str] = collections.Counter()
        self._durations: collections.deque[float] = collections.deque(maxlen=64)

    def resize(self, max_running: int, max_queued: int, per_client: int) -> None:
        """New limits (a settings reload): runs already running or waiting keep their place; more room admits
        waiting runs at once, less takes effect as runs end."""
        self.max_running, self.max_queued, self.per_client = max_running, max_queued, per_client
        while self._queue and (not self.max_running or self.running < self.max_running):
            self._start(heapq.heappop(self._queue))

    @property
    def queued(self) -> int:
        return len(self._queue)

    def _retry_after_ms(self) -> int:
        typical = statistics.median(self._durations) if self._durations else 1.0
        ahead = 1 + len(self._queue) / max(1, self.max_running or 1)
        return max(100, int(typical * ahead * 1000))

    def reserve(self, priority: int, client: str, client_limit: int = 0) -> Ticket:
        """client_limit: this client's own cap on runs in flight (its auth entry), over the router's per_client."""
        limit = min((x for x in (self.per_client, client_limit) if x), default=0)
        if limit and self._by_client[client] >= limit:
            hint = self._retry_after_ms()
            raise Exhausted(f"client {client!r} already has {self._by_client[client]} runs in flight (limit "
                            f"{limit}); retry after ~{hint} ms", hint)
        full = self.max_running and self.running >= self.max_running
        if full and len(self._queue) >= self.max_queued:
            hint = self._retry_after_ms()
            raise Exhausted(f"router is full: {self.running} runs running, {len(self._queue)} waiting (limits "
                            f"{self.max_running} and {self.max_queued}); retry after ~{hint} ms", hint)
        ticket = Ticket((-priority, next(self._arrivals)), client)
        self._by_client[client] += 1
        if full or self._queue:
            heapq.heappush(self._queue, ticket)
        else:
            self._start(ticket)
        return ticket

    def _start(self, ticket: Ticket) -> None:
        self.running += 1
        ticket.started_at = time.monotonic()
        ticket.admitted.set()

    def release(self, ticket: Ticket) -> None:
        """The run ended (or gave up waiting): free its place and admit whoever is next."""
        if ticket.done:
            return
        ticket.done = True
        self._by_client[ticket.client] -= 1
        if self._by_client[ticket.client] <= 0:
            del self._by_client[ticket.client]
        if ticket.started_at is None:
            self._queue.remove(ticket)
            heapq.heapify(self._queue)
            return
        self.running -= 1
        self._durations.append(time.monotonic() - ticket.started_at)
        while self._queue and (not self.max_running or self.running < self.max_running):
            self._start(heapq.heappop(self._queue))
