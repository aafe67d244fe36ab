"""One router-to-worker link: Info on connect, then one bidirectional Connect stream that multiplexes
every task sent to that worker. Reconnects with backoff; a broken stream fails the tasks on it with
UNAVAILABLE so no task waits forever, and so does a silent one (a hung worker)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc

from router.breaker import Breaker
from trellis_rpc.errors import StatusError, code_from_number, code_number
from trellis_rpc.server import CHANNEL_OPTIONS
from trellis_rpc.tls import ClientTLS
from trellis_rpc.v1 import worker_pb2, worker_pb2_grpc

log = structlog.get_logger(__name__)

_CLOSE = object()
# A worker sends a load report at least once a second even when idle (WorkerService.heartbeat_s), so a
# link that has carried nothing for this long is a worker that hangs without answering (SIGSTOPped,
# wedged, a half-open connection): the link gives up on it and its tasks fail over at once. gRPC
# keepalive does not catch this in time: grpcio (1.85) closes a transport whose keepalive ping goes
# unanswered only after grpc.http2.ping_timeout_ms (default 60 s), not keepalive_timeout_ms, so with
# CHANNEL_OPTIONS a SIGSTOPped worker held its tasks for 60 s (tests/test_faults.py).
SILENCE_S = 5.0
WORKER_SERVICE = worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name


class WorkerConnection:
    """The router's link to one worker: one multiplexed Connect stream, reopened when it breaks.
    `service` (a WorkerService in this process) replaces the gRPC channel: notebooks and tests run
    controllers against in-process workers through exactly the same dispatch path."""

    def __init__(self, address: str, on_ready: asyncio.Event, service=None, on_drop=None,
                 breaker: Breaker | None = None, tls: ClientTLS | None = None, silence_s: float = SILENCE_S) -> None:
        self.address = address
        # An in-process service shares this event loop: its silence cannot mean a hung peer.
        self.silence_s = None if service else silence_s
        self.info: worker_pb2.WorkerInfo | None = None
        self.load: worker_pb2.LoadReport | None = None
        self.ready = False
        self.retiring = False            # discovery no longer lists it: no new tasks
        self.breaker = breaker or Breaker()
        self._probe: asyncio.Task | None = None
        self.last_error = "not connected yet"
        self._on_ready = on_ready
        self._on_drop = on_drop
        self._service = service
        self._tls = tls
        self._tls_version = tls.version() if tls else ()
        self._channel = None if service else self._open_channel()
        self._stub = None if service else worker_pb2_grpc.WorkerStub(self._channel)
        self._pending: dict[str, asyncio.Queue] = {}
        self._outbox: asyncio.Queue | None = None
        self._runner: asyncio.Task | None = None

    def _open_channel(self) -> grpc.aio.Channel:
        if self._tls is None:
            return grpc.aio.insecure_channel(self.address, options=CHANNEL_OPTIONS)
        return grpc.aio.secure_channel(self.address, self._tls.credentials(),
                                       options=CHANNEL_OPTIONS + self._tls.options())

    async def _renew_channel(self) -> None:
        """Between connections: if the TLS files were rotated, dial with the new ones from now on."""
        if self._tls is None or self._service is not None:
            return
        version = self._tls.version()
        if not version or version == self._tls_version:
            return
        old, self._tls_version = self._channel, version
        self._channel = self._open_channel()
        self._stub = worker_pb2_grpc.WorkerStub(self._channel)
        log.info("worker tls files changed: new channel", worker=self.address)
        await old.close()

    async def _info(self) -> worker_pb2.WorkerInfo:
        if self._service is not None:
            return self._service.info_pb()
        await self._renew_channel()
        return await self._stub.Info(worker_pb2.InfoRequest(), timeout=5, wait_for_ready=False)

    def _connect(self, requests: AsyncIterator[worker_pb2.WorkerRequest]):
        if self._service is not None:
            return _LocalCall(self._service.Connect(requests, None))
        return self._stub.Connect(requests)

    @property
    def routable(self) -> bool:
        return self.ready and not self.retiring and not self.breaker.open and self.info is not None

    def _task_ended(self, response: worker_pb2.WorkerResponse) -> None:
        if not self.ready:
            return  # the link broke (see _drop): not the worker failing tasks it was given
        code = code_from_number(response.error.code) if response.WhichOneof("kind") == "error" else None
        if self.breaker.record(code):
            log.warning("worker ejected: failing tasks", worker=self.address, code=code.name,
                        retry_in_s=round(self.breaker.retry_at - time.monotonic(), 1))
            self._probe = asyncio.ensure_future(self._readmit())

    async def _readmit(self) -> None:
        """After the cooldown, readmit the worker once grpc.health.v1 says it is SERVING again."""
        while self.breaker.open:
            await asyncio.sleep(max(0.0, self.breaker.retry_at - time.monotonic()))
            if await self._healthy():
                self.breaker.close()
                log.info("worker readmitted", worker=self.address)
                return
            self.breaker.retry_at = time.monotonic() + self.breaker.base_cooldown_s

    async def _healthy(self) -> bool:
        if self._service is not None:
            return self._service.engine is not None or self._service.scorer is not None
        try:
            reply = await health_pb2_grpc.HealthStub(self._channel).Check(
                health_pb2.HealthCheckRequest(service=WORKER_SERVICE), timeout=2)
        except grpc.aio.AioRpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    @property
    def outstanding(self) -> int:
        return len(self._pending)

    @property
    def reported_load(self) -> tuple[int, int]:
        """(queued + running sequences, KV blocks in use) from the worker's last load report."""
        if self.load is None:
            return 0, 0
        return self.load.queue_depth + self.load.running_sequences, self.load.kv_blocks_used

    def start(self) -> None:
        self._runner = asyncio.create_task(self._maintain())

    async def close(self) -> None:
        for task in (self._runner, self._probe):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._drop("the router closed its link to this worker")  # nothing may wait on a closed link
        if self._channel is not None:
            await self._channel.close()

    async def _maintain(self) -> None:
        backoff = 0.1
        while True:
            try:
                self.info = await self._info()
                await self._stream()
                backoff = 0.1
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as err:
                self.last_error = f"{err.code().name}: {err.details()}"
            except Exception as err:  # keep the link alive whatever happened
                self.last_error = repr(err)
                log.exception("worker link failed", worker=self.address)
            self._drop(self.last_error)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    async def _stream(self) -> None:
        outbox: asyncio.Queue = asyncio.Queue()

        async def requests() -> AsyncIterator[worker_pb2.WorkerRequest]:
            while (item := await outbox.get()) is not _CLOSE:
                yield item

        call = self._connect(requests())
        self._outbox = outbox
        self.ready = True
        self._on_ready.set()
        log.info("worker connected", worker=self.address, worker_id=self.info.worker_id, model_id=self.info.model_id)
        loop = asyncio.get_running_loop()
        silence_s, moved = self.silence_s, loop.time()
        try:
            async with asyncio.timeout_at(None if silence_s is None else moved + silence_s) as silent:
                async for response in call:
                    # Heard from the worker: push the silence deadline back (at most twice a second, which
                    # costs next to nothing per message; ~4 us per message otherwise).
                    if silence_s is not None and (now := loop.time()) - moved >= 0.5:
                        silent.reschedule(now + silence_s)
                        moved = now
                    if response.WhichOneof("kind") == "load":
                        self.load = response.load
                        continue
                    queue = self._pending.get(response.task_id)
                    if queue is not None:
                        queue.put_nowait(response)
            self.last_error = "worker closed the stream"
        except TimeoutError:
            self.last_error = f"worker sent nothing (not even a load report) for {silence_s:g} s: hung or unreachable"
        finally:
            outbox.put_nowait(_CLOSE)
            call.cancel()

    def _drop(self, reason: str) -> None:
        """The stream is gone: every task on it fails now rather than waiting for an answer that never comes."""
        if self.ready:
            log.warning("worker disconnected", worker=self.address, reason=reason, tasks=len(self._pending))
        self.ready = False
        if self._on_drop is not None:
            self._on_drop(self)  # a reconnected worker may have restarted with an empty cache
        self._outbox = None
        error = worker_pb2.WorkerResponse(error=worker_pb2.TaskError(
            code=code_number(grpc.StatusCode.UNAVAILABLE), message=f"worker {self.address} disconnected: {reason}"))
        for queue in self._pending.values():
            queue.put_nowait(error)

    def post(self, request: worker_pb2.WorkerRequest) -> bool:
        """Send a message that gets no reply (a release); False when the link is down (nothing to tell then:
        a worker that lost its link to us still frees what it kept when the sequences expire)."""
        if not self.ready or self._outbox is None:
            return False
        self._outbox.put_nowait(request)
        return True

    async def submit(self, request: worker_pb2.WorkerRequest) -> AsyncIterator[worker_pb2.WorkerResponse]:
        """Send one task; yield its responses until its result or error. Cancelling the consumer cancels the task."""
        if not self.ready or self._outbox is None:
            raise StatusError(grpc.StatusCode.UNAVAILABLE, f"worker {self.address} is not connected: {self.last_error}")
        task_id = request.task_id
        queue: asyncio.Queue = asyncio.Queue()
        self._pending[task_id] = queue
        outbox = self._outbox
        outbox.put_nowait(request)
        finished = False
        try:
            while True:
                response = await queue.get()
                kind = response.WhichOneof("kind")
                finished = kind in ("generate_result", "score_result", "error")
                if finished:
                    self._task_ended(response)
                yield response
                if finished:
                    return
        finally:
            self._pending.pop(task_id, None)
            if not finished and outbox is self._outbox:
                outbox.put_nowait(worker_pb2.WorkerRequest(
                    task_id=f"{task_id}:cancel", cancel=worker_pb2.CancelTask(target_task_id=task_id)))


class _LocalCall:
    """An in-process Connect stream with the two things _stream uses of a gRPC call."""

    def __init__(self, responses: AsyncIterator[worker_pb2.WorkerResponse]) -> None:
        self._responses = responses

    def __aiter__(self) -> AsyncIterator[worker_pb2.WorkerResponse]:
        return self._responses.__aiter__()

    def cancel(self) -> None:
        asyncio.ensure_future(self._responses.aclose())
