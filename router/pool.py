"""The workers a router knows and how it picks one for a task.

Among the connected workers that serve the model and capability (and whose circuit is closed), the
routing policy (router/routing.py) picks one: by default the KV-aware cost, prefix overlap against
load; least-loaded and round-robin on request. Discovery (router/discovery.py) adds and removes links.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection

import grpc

from router import metrics
from router.routing import RoutingPolicy, prefix_hashes
from router.worker_connection import WorkerConnection
from trellis_rpc.errors import StatusError
from trellis_rpc.tls import ClientTLS
from trellis_rpc.v1 import common_pb2

# Workers named one by one in a "no worker can ..." message; the rest are counted.
MAX_NAMED = 8

_VERBS = {
    common_pb2.CAPABILITY_GENERATE: "generate",
    common_pb2.CAPABILITY_SCORE_OUTCOME: "score outcomes",
    common_pb2.CAPABILITY_SCORE_PROCESS: "score process steps",
    common_pb2.CAPABILITY_SCORE_VERIFIER: "verify",
    common_pb2.CAPABILITY_KEEP_SEQUENCES: "keep sequences",
    common_pb2.CAPABILITY_PREFIX_CACHE: "cache prefixes",
}

# What a task asks for (the rest are features of generate): what a worker "can" in the message.
_TASKS = {common_pb2.CAPABILITY_GENERATE, common_pb2.CAPABILITY_SCORE_OUTCOME, common_pb2.CAPABILITY_SCORE_PROCESS,
          common_pb2.CAPABILITY_SCORE_VERIFIER}


def can(capability: int) -> str:
    """A capability as a verb: "no worker can score outcomes"."""
    if capability in _VERBS:
        return _VERBS[capability]
    try:
        return common_pb2.Capability.Name(capability).removeprefix("CAPABILITY_").lower().replace("_", " ")
    except ValueError:
        return f"serve capability {capability}"


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

        # Discovery.sources once a Discovery feeds this pool (router/cli.py): where the workers come from, in
        # words, for the message of a task no worker can take
        self.sources: Callable[[], list[str]] | None = None
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
                raise NoWorker(grpc.StatusCode.UNAVAILABLE, self._why_none(model, capability, worker_id))
            self._any_ready.clear()
            try:
                await asyncio.wait_for(self._any_ready.wait(), timeout=min(left, 0.25))
            except TimeoutError:
                pass

    def _why_none(self, model: str, capability: int, worker_id: str = "") -> str:
        """One sentence a user can act on: what the task needed, where the router looks for workers and what
        it found there, how many are connected, and why each known worker cannot take the task."""
        if worker_id:
            state = "cannot take it" if any(w.ready and w.info and w.info.worker_id == worker_id
                                             for w in self.workers) else "is not connected"
            lead = f"worker {worker_id!r}, which holds the sequence to continue, {state}"
        else:
            lead = f"no worker can {can(capability)}" + (f" for model {model!r}" if model else "")
        parts = self.sources() if self.sources is not None else []
        connected = sum(w.ready for w in self.workers)
        parts.append(f"{connected} of {len(self.workers)} connected" if self.workers else "0 connected")
        if not self.workers and self.sources is None:
            parts = ["no worker configured"]
        reasons = [f"{w.address} {self._why_not(w, model, capability, worker_id)}" for w in self.workers[:MAX_NAMED]]
        if len(self.workers) > MAX_NAMED:
            reasons.append(f"and {len(self.workers) - MAX_NAMED} more")
        return f"{lead}: " + "; ".join(parts + reasons)

    @staticmethod
    def _why_not(w: WorkerConnection, model: str, capability: int, worker_id: str) -> str:
        """Why this worker cannot take the task (the first reason that applies)."""
        if w.retiring:
            n = w.outstanding
            return f"is draining: discovery no longer lists it ({n} task{'' if n == 1 else 's'} still running there)"
        if not w.ready or w.info is None:
            error = w.last_error
            if error == "not connected yet":
                return "is not connected yet"
            if "failed to connect to all addresses" in error:   # gRPC's wording; the cause comes last
                error = "cannot connect: " + error.rsplit(": ", 1)[-1]
            return f"is not connected ({error if len(error) <= 200 else error[:200] + '...'})"
        if w.breaker.open:
            left = w.breaker.retry_at - time.monotonic()
            retry = f"health check in {left:.1f} s" if left > 0 else "back once its health check passes"
            return f"was ejected by the breaker after {w.breaker.threshold} failed tasks in a row ({retry})"
        if model and w.info.model_id != model:
            return f"serves model {w.info.model_id!r}"
        if capability not in w.info.capabilities:
            offers = ", ".join(can(c) for c in w.info.capabilities if c in _TASKS) or "nothing"
            return f"cannot {can(capability)} (it can {offers})"
        if worker_id and w.info.worker_id != worker_id:
            return f"is worker {w.info.worker_id!r}"
        return "could take it now"

    def models(self) -> list[str]:
        return sorted({w.info.model_id for w in self.workers if w.ready and w.info})

    def queued(self) -> int:
        """Tasks waiting at the workers (their last load reports): work the workers cannot start yet."""
        return sum(w.load.queue_depth for w in self.workers if w.ready and w.load is not None)
