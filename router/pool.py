"""The workers a router knows and how it picks one for a task.

Among the connected workers that serve the model and capability (and whose circuit is closed), the
routing policy (router/routing.py) picks one: by default the KV-aware cost, prefix overlap against
load; least-loaded and round-robin on request. Discovery (router/discovery.py) adds and removes links.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection

import grpc

from router import metrics
from router.routing import RoutingPolicy, prefix_hashes
from router.worker_connection import WorkerConnection
from trellis_rpc.errors import StatusError
from trellis_rpc.tls import ClientTLS
from trellis_rpc.v1 import common_pb2


class NoWorker(StatusError):
    """No worker could take the task (as opposed to a worker failing under it)."""


class WorkerPool:
    def __init__(self, addresses: list[str], services: list | None = None, routing: RoutingPolicy | None = None,
                 tls: ClientTLS | None = None) -> None:
        """addresses: workers over gRPC (TLS when tls is given); services: WorkerService objects in this process."""
        self._any_ready = asyncio.Event()
        self.routing = routing or RoutingPolicy()
        self.tls = tls
        self.workers = [WorkerConnection(a, self._any_ready, on_drop=self.routing.forget, tls=tls) for a in addresses]
        self.workers += [WorkerConnection(f"in-process:{s.worker_id}", self._any_ready, service=s,
                                          on_drop=self.routing.forget) for s in services or []]

        self._started = False
        self._retiring: set[asyncio.Task] = set()

    def start(self) -> None:
        self._started = True
        for w in self.workers:
            w.start()

    async def close(self) -> None:
        for task in self._retiring:
            task.cancel()
        await asyncio.gather(*(w.close() for w in self.workers))

    def update(self, addresses: set[str]) -> None:
        """Make the remote workers exactly `addresses` (discovery): connect new ones, retire gone ones."""
        known = {w.address for w in self.workers if not w.retiring}
        for address in sorted(addresses - known):
            link = WorkerConnection(address, self._any_ready, on_drop=self.routing.forget, tls=self.tls)
            self.workers.append(link)
            if self._started:
                link.start()
        for w in self.workers:
            if w.address not in addresses and not w.retiring and not w.address.startswith("in-process:"):
                w.retiring = True
                task = asyncio.ensure_future(self._retire(w))
                self._retiring.add(task)
                task.add_done_callback(self._retiring.discard)

    async def _retire(self, w: WorkerConnection) -> None:
        """No new tasks go to w; its link closes once the tasks in flight there are done."""
        while w.outstanding and w.ready:
            await asyncio.sleep(0.1)
        await w.close()
        self.workers.remove(w)

    def _candidates(self, model: str, capability: int, worker_id: str = "") -> list[WorkerConnection]:
        return [
            w for w in self.workers
            if w.routable and capability in w.info.capabilities
            and (not model or w.info.model_id == model) and (not worker_id or w.info.worker_id == worker_id)
        ]

    async def pick(self, model: str = "", capability: int = common_pb2.CAPABILITY_GENERATE,
                   wait_s: float = 0.0, worker_id: str = "", prompt_key: str = "",
                   avoid: Collection[str] = (), home: str = "") -> WorkerConnection:
        """A worker for the task (the one named worker_id, if given; else by the routing policy, which
        weighs how much of prompt_key each worker holds against its load); waits up to wait_s for one
        to connect, then UNAVAILABLE with the reasons. avoid: worker ids that just failed this task (a
        migration), passed over while another candidate exists: a worker whose backend died keeps its link
        up, and prefix affinity would send the resumed task, which shares its prefix, straight back."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        hashes = prefix_hashes(prompt_key) if prompt_key and self.routing.policy == "kv" else []
        while True:
            candidates = self._candidates(model, capability, worker_id)
            if avoid:
                candidates = [w for w in candidates if w.info.worker_id not in avoid] or candidates
            if candidates:
                decision = self.routing.choose(candidates, hashes, home)
                self.routing.record(decision.worker, hashes)
                metrics.routing_decisions.add(1, "pinned" if worker_id else decision.policy,
                                              decision.overlap_blocks > 0)
                return decision.worker
            left = deadline - loop.time()
            if left <= 0:
                why = self._why_none(model, capability)
                if worker_id:
                    why = f"worker {worker_id!r}, which holds the sequence to continue, is not connected; {why}"
                raise NoWorker(grpc.StatusCode.UNAVAILABLE, why)
            self._any_ready.clear()
            try:
                await asyncio.wait_for(self._any_ready.wait(), timeout=min(left, 0.25))
            except TimeoutError:
                pass

    def _why_none(self, model: str, capability: int) -> str:
        cap = common_pb2.Capability.Name(capability)
        what = f"{cap}" + (f" for model {model!r}" if model else "")
        if not self.workers:
            return f"no worker configured ({what})"
        states = "; ".join(
            f"{w.address}: " + ("ejected after failing tasks" if w.breaker.open else
                                f"serves {w.info.model_id}" if w.ready and w.info else w.last_error)
            for w in self.workers)
        return f"no reachable worker offers {what} ({states})"

    def models(self) -> list[str]:
        return sorted({w.info.model_id for w in self.workers if w.ready and w.info})

    def queued(self) -> int:
        """Tasks waiting at the workers (their last load reports): work the workers cannot start yet."""
        return sum(w.load.queue_depth for w in self.workers if w.ready and w.load is not None)
