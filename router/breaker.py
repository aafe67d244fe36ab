"""A circuit breaker per worker link: a worker that keeps failing tasks is ejected from routing, then
readmitted once its health check passes again.

Only failures that say the worker is unwell count (INTERNAL, UNKNOWN, DATA_LOSS, UNAVAILABLE sent by
the worker itself); a bad request (INVALID_ARGUMENT, ...) is the caller's, and a broken stream already
takes the link out of routing until it reconnects. After `threshold` such failures in a row the
breaker opens for a cooldown that doubles with each trip (up to max_cooldown_s); then the router asks
grpc.health.v1 and closes the breaker when the worker answers SERVING.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import grpc

UNWELL = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS, grpc.StatusCode.UNAVAILABLE}


@dataclass
class Breaker:
    threshold: int = 5
    base_cooldown_s: float = 2.0
    max_cooldown_s: float = 30.0
    failures: int = 0            # unwell failures in a row
    trips: int = 0               # consecutive trips (sets the cooldown)
    open: bool = False
    retry_at: float = 0.0        # when a health check may close it

    def record(self, code: grpc.StatusCode | None) -> bool:
        """A task ended (code None: it succeeded). Returns True when this failure trips the breaker."""
        if code is None:
            self.failures = 0
            return False
        if code not in UNWELL or self.open:
            return False
        self.failures += 1
        if self.failures < self.threshold:
            return False
        self.trips += 1
        self.open = True
        self.failures = 0
        self.retry_at = time.monotonic() + min(self.max_cooldown_s, self.base_cooldown_s * 2 ** (self.trips - 1))
        return True

    def close(self) -> None:
        self.open = False
        self.trips = 0
