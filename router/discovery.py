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
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)


def _dns(name: str, port: str) -> set[str]:
    infos = socket.getaddrinfo(name, int(port), type=socket.SOCK_STREAM)
    return {f"[{info[4][0]}]:{port}" if info[0] == socket.AF_INET6 else f"{info[4][0]}:{port}" for info in infos}


def _file(path: str) -> set[str]:
    lines = Path(path).read_text().replace(",", "\n").splitlines()
    return {line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")}


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


class Discovery:
    def __init__(self, pool, specs: list[str], interval_s: float = 5.0) -> None:
        self.pool = pool
        self.specs = specs
        self.interval_s = interval_s
        self._last: dict[str, set[str]] = {}
        self._task: asyncio.Task | None = None

    def resolve_all(self) -> set[str]:
        addresses: set[str] = set()
        for gone in set(self._last) - set(self.specs):    # an entry a settings reload removed
            del self._last[gone]
        for spec in self.specs:
            try:
                found = resolve(spec)
            except (OSError, ValueError) as err:
                log.warning("worker discovery failed", source=spec, error=str(err))
                found = self._last.get(spec, set())
            if found != self._last.get(spec):
                log.info("workers discovered", source=spec, addresses=sorted(found))
            self._last[spec] = found
        return addresses.union(*self._last.values())

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
