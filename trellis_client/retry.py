"""Opt-in retry of calls the router refused before doing anything: RESOURCE_EXHAUSTED (admission full) and
UNAVAILABLE (no worker, or the router restarting). A stream is retried only while nothing of it has arrived;
after that a retry would repeat events the caller has already seen."""

from __future__ import annotations

import random
from dataclasses import dataclass

from trellis_client.errors import TrellisError


@dataclass(frozen=True)
class Retry:
    attempts: int = 3            # calls in all, the first included
    backoff: float = 0.25        # seconds before the second call when the router gave no hint; doubles each time
    max_wait: float = 30.0       # never wait longer than this between calls, whatever the hint says

    def wait(self, err: TrellisError, attempt: int) -> float | None:
        """Seconds to wait before call number attempt+1, or None: give up and raise err."""
        if not err.retryable or attempt >= self.attempts:
            return None
        if err.retry_after is not None:
            return min(self.max_wait, err.retry_after)
        # full jitter on the exponential step, so clients refused together do not return together
        return min(self.max_wait, self.backoff * 2 ** (attempt - 1) * (0.5 + random.random() / 2))


def policy(retry: Retry | bool | int | None) -> Retry | None:
    """retry=True: the defaults; an int: that many attempts; None or False: no retry."""
    if retry is True:
        return Retry()
    if retry is None or retry is False:
        return None
    if isinstance(retry, int):
        return Retry(attempts=retry)
    return retry
