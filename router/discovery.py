"""Where the workers are: a static list, DNS names re-resolved every few seconds (a Kubernetes headless
service resolves to one address per ready pod), or a file re-read as often (a mounted ConfigMap).

    --workers 10.0.0.5:50061,dns:worker-cpu.trellis.svc.cluster.local:50061,file:/etc/trellis/workers

Workers that appear are connected; workers that disappear are retired: they get no new tasks and
their link closes once the tasks in flight there have finished (a pod that is scaled down drains
its work on SIGTERM meanwhile). A lookup that fails keeps that source's last answer, so a DNS hiccup
does not empty the pool.
"""

from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)


def _dns(name: str, port: str) -> set[str]:
    infos = socket.getaddrinfo(name, int(port), type=socket.SOCK_STREAM)
    return {f"[{info[4][0]}]:{port}" if info[0] == socket.AF_INET6 else f"{info[4][0]}:{port}" for info in infos}


def _file(path: str) -> set[str]:
    lines = [line for line in Path(path).read_text().splitlines() if not line.lstrip().startswith("#")]
    return {entry.strip() for line in lines for entry in line.split(",") if entry.strip()}


def resolve(spec: str) -> set[str]:
    """Addresses one --workers entry stands for now (raises OSError when it cannot be read)."""
    if spec.startswith("dns:"):
        name, _, port = spec[len("dns:"):].rpartition(":")
        if not name or not port.isdigit():
            raise ValueError(f"{spec!r}: expected dns:NAME:PORT")
        return _dns(name, port)
    if spec.startswith("file:"):
        return _file(spec[len("file:"):])
    return {spec}


def is_dynamic(spec: str) -> bool:
    return spec.startswith(("dns:", "file:"))


@dataclass(frozen=True)
class Lookup:
    """What one --workers entry gave the last time it was looked up (replaced whole, never mutated: the
    lookups run in an executor thread while the event loop reads them for error messages)."""

    found: frozenset[str]        # the addresses in use: the last answer, kept when a lookup fails
    looked_at: float             # time.monotonic() of the last lookup, failed or not
    answered: bool = False       # whether any lookup of it ever succeeded
    error: str = ""              # why the last lookup failed ("" : it did not)


def _reason(err: Exception) -> str:
    """An OSError's reason without its errno prefix (the path or name is already in the spec)."""
    return err.strerror if isinstance(err, OSError) and err.strerror else str(err)


def _workers(n: int) -> str:
    return "none" if n == 0 else "1 worker" if n == 1 else f"{n} workers"


def describe(spec: str, lookup: Lookup | None, now: float | None = None) -> str:
    """One source as a user reads it: what it gave, when it was last looked at, and whether that failed.
    "static 10.0.0.5:50061"; "file:/etc/trellis/workers lists none (read 1.0 s ago)";
    "dns:worker.svc:50061 failed 3.2 s ago (Name or service not known), using its last answer (2 workers)"."""
    if not is_dynamic(spec):
        return f"static {spec}"
    if lookup is None:
        return f"{spec} not looked up yet"
    age = f"{max(0.0, (time.monotonic() if now is None else now) - lookup.looked_at):.1f} s ago"
    n = len(lookup.found)
    if lookup.error:
        kept = f"using its last answer ({_workers(n)})" if lookup.answered else "no answer yet"
        return f"{spec} failed {age} ({lookup.error}), {kept}"
    if spec.startswith("file:"):
        return f"{spec} lists {'none' if n == 0 else n} (read {age})"
    return f"{spec} resolves to {_workers(n)} (looked up {age})"


class Discovery:
    def __init__(self, pool, specs: list[str], interval_s: float = 5.0) -> None:
        self.pool = pool
        self.specs = specs
        self.interval_s = interval_s
        self._last: dict[str, Lookup] = {}
        self._task: asyncio.Task | None = None

    def resolve_all(self) -> set[str]:
        for gone in set(self._last) - set(self.specs):    # an entry a settings reload removed
            del self._last[gone]
        for spec in self.specs:
            before = self._last.get(spec)
            try:
                lookup = Lookup(frozenset(resolve(spec)), time.monotonic(), answered=True)
            except (OSError, ValueError) as err:
                log.warning("worker discovery failed", source=spec, error=str(err))
                lookup = Lookup(before.found if before else frozenset(), time.monotonic(),
                                answered=bool(before and before.answered), error=_reason(err))
            if before is None or lookup.found != before.found:
                log.info("workers discovered", source=spec, addresses=sorted(lookup.found))
            self._last[spec] = lookup
        return set().union(*(lookup.found for lookup in self._last.values()))

    def sources(self) -> list[str]:
        """Each --workers entry in words: what it last gave, how long ago, and whether its lookup failed."""
        now = time.monotonic()
        last = dict(self._last)
        return [describe(spec, last.get(spec), now) for spec in list(self.specs)]

    async def refresh(self) -> None:
        addresses = await asyncio.get_running_loop().run_in_executor(None, self.resolve_all)
        self.pool.update(addresses)

    def start(self) -> None:
        """Re-resolve dns: and file: entries periodically (a no-op if none, or if already doing so)."""
        if self._task is None and any(is_dynamic(s) for s in self.specs):
            self._task = asyncio.create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.refresh()
            except Exception:  # discovery must outlive any one bad refresh
                log.exception("worker discovery refresh failed")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
