"""The asyncio client: the same methods as Client, awaited. Cancelling the awaiting task cancels the run."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from trellis_client import convert
from trellis_client import types as t
from trellis_client.connection import Target
from trellis_client.errors import TrellisError
from trellis_client.requests import PromptLike, SamplingLike, generate_request, run_request, score_request
from trellis_client.retry import Retry, policy
from trellis_client.sync_client import ROUTER_SERVICE
from trellis_rpc.tls import ClientTLS
from trellis_rpc.v1 import router_pb2, router_pb2_grpc

T = TypeVar("T")


class AsyncEventStream:
    """The events of one run; `async for` over it, or await result(). Leaving it (break, aclose(), the end of an
    `async with` block, cancelling the task that reads it) cancels the run on the router."""

    def __init__(self, start: Callable[[], Any], retry: Retry | None) -> None:
        self._start = start
        self._retry = retry
        self._attempt = 1
        self._received = False
        self._call = start()
        self.result_: t.Result | None = None

    def __aiter__(self) -> AsyncIterator[t.Event]:
        return self

    async def __anext__(self) -> t.Event:
        while True:
            try:
                message = await self._call.read()
            except grpc.RpcError as err:
                error = TrellisError.from_rpc_error(err)
                wait = None if self._retry is None or self._received else self._retry.wait(error, self._attempt)
                if wait is None:
                    raise error from None
                await asyncio.sleep(wait)
                self._attempt += 1
                self._call = self._start()
                continue
            except asyncio.CancelledError:
                self._call.cancel()
                raise
            if message is grpc.aio.EOF:
                raise StopAsyncIteration
            self._received = True
            event = convert.event(message)
            if event is None:
                continue
            if isinstance(event, t.Final):
                self.result_ = event.result
            return event

    async def result(self) -> t.Result:
        async for _ in self:
            pass
        if self.result_ is None:
            raise TrellisError(grpc.StatusCode.UNKNOWN, "the stream ended without a result")
        return self.result_

    def cancel(self) -> None:
        self._call.cancel()

    async def aclose(self) -> None:
        self.cancel()

    async def __aenter__(self) -> AsyncEventStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cancel()

    def __del__(self) -> None:
        call = getattr(self, "_call", None)
        try:
            if call is not None and not call.done():
                call.cancel()
        except Exception:   # a loop already closed at exit: nothing left to cancel on
            pass


class AsyncRunHandle:
    """One run of an AsyncSession: its events (readable any number of times), its result, its cancellation."""

    def __init__(self, session: AsyncSession, run_id: str) -> None:
        self.session = session
        self.run_id = run_id
        self._history: list[t.Event] = []
        self._changed = asyncio.Event()
        self.outcome: t.Final | t.Failed | None = None

    def _put(self, event: t.Event) -> None:
        if isinstance(event, t.Final | t.Failed):
            self.outcome = event
        self._history.append(event)
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()           # wakes whoever waits for this event; later waiters wait on the new one

    async def events(self) -> AsyncIterator[t.Event]:
        i = 0
        while True:
            while len(self._history) <= i:
                await self._changed.wait()
            event = self._history[i]
            i += 1
            yield event
            if isinstance(event, t.Final | t.Failed):
                return

    async def result(self) -> t.Result:
        while self.outcome is None:
            await self._changed.wait()
        if isinstance(self.outcome, t.Failed):
            raise self.outcome.error
        return self.outcome.result

    async def cancel(self) -> None:
        await self.session.cancel(self.run_id)


class AsyncSession:
    """Many runs over one Router.Session stream; use as `async with client.session() as s:`."""

    def __init__(self, stub: router_pb2_grpc.RouterStub, metadata: tuple, timeout: float | None) -> None:
        self._call = stub.Session(metadata=metadata, timeout=timeout)
        self._runs: dict[str, AsyncRunHandle] = {}
        self.error: TrellisError | None = None
        self._reader = asyncio.create_task(self._read())

    async def submit(self, controller: str, prompt: PromptLike, *, params: Mapping[str, Any] | None = None,
                     sampling: SamplingLike = None, model: str = "", priority: int = 0, run_id: str = "",
                     stream_tokens: bool = True, raw: bool = False, system: str = "") -> AsyncRunHandle:
        if self.error is not None:
            raise self.error
        run_id = run_id or uuid.uuid4().hex
        request = run_request(controller, prompt, params=params, sampling=sampling, model=model, priority=priority,
                              run_id=run_id, stream_tokens=stream_tokens, raw=raw, system=system)
        handle = self._runs[run_id] = AsyncRunHandle(self, run_id)
        await self._call.write(router_pb2.SessionRequest(run=request))
        return handle

    async def cancel(self, run_id: str) -> None:
        await self._call.write(router_pb2.SessionRequest(cancel=router_pb2.CancelRun(run_id=run_id)))

    async def _read(self) -> None:
        try:
            async for message in self._call:
                event = convert.event(message)
                handle = self._runs.get(message.run_id)
                if event is not None and handle is not None:
                    handle._put(event)
        except grpc.RpcError as err:
            self.error = TrellisError.from_rpc_error(err)
        except asyncio.CancelledError:
            pass
        finally:
            error = self.error or TrellisError(grpc.StatusCode.CANCELLED, "the session ended before this run")
            for handle in self._runs.values():
                if handle.outcome is None:
                    handle._put(t.Failed(handle.run_id, 0.0, error))

    async def close(self, cancel: bool = False) -> None:
        if cancel:
            self._call.cancel()
        else:
            await self._call.done_writing()
        await self._reader

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(self, exc_type: object, *exc: object) -> None:
        await self.close(cancel=exc_type is not None)


class AsyncClient:
    """The asyncio twin of Client (same arguments, same methods, awaited). Open it inside the event loop that
    uses it; close with `await client.close()` or `async with AsyncClient(...) as client:`."""

    def __init__(self, address: str | None = None, *, tls: ClientTLS | bool | str | Path | None = None,
                 token: str | None = None, retry: Retry | bool | int | None = None) -> None:
        self.target = Target.of(address, tls, token)
        self.retry = policy(retry)
        self._channel = self.target.aio_channel()
        self._stub = router_pb2_grpc.RouterStub(self._channel)

    @property
    def address(self) -> str:
        return self.target.address

    async def _unary(self, method: Callable[..., Awaitable[T]], request: object, deadline: float | None,
                     token: str | None) -> T:
        attempt = 1
        while True:
            try:
                return await method(request, timeout=deadline, metadata=self.target.metadata(token))
            except grpc.RpcError as err:
                error = TrellisError.from_rpc_error(err)
                wait = None if self.retry is None else self.retry.wait(error, attempt)
                if wait is None:
                    raise error from None
                await asyncio.sleep(wait)
                attempt += 1

    async def run(self, controller: str, prompt: PromptLike, *, params: Mapping[str, Any] | None = None,
                  sampling: SamplingLike = None, model: str = "", priority: int = 0, deadline: float | None = None,
                  run_id: str = "", raw: bool = False, system: str = "", token: str | None = None) -> t.Result:
        request = run_request(controller, prompt, params=params, sampling=sampling, model=model, priority=priority,
                              run_id=run_id, stream_tokens=False, raw=raw, system=system)
        return convert.result(await self._unary(self._stub.Run, request, deadline, token))

    def stream(self, controller: str, prompt: PromptLike, *, params: Mapping[str, Any] | None = None,
               sampling: SamplingLike = None, model: str = "", priority: int = 0, deadline: float | None = None,
               run_id: str = "", stream_tokens: bool = True, raw: bool = False, system: str = "",
               token: str | None = None) -> AsyncEventStream:
        request = run_request(controller, prompt, params=params, sampling=sampling, model=model, priority=priority,
                              run_id=run_id, stream_tokens=stream_tokens, raw=raw, system=system)
        return AsyncEventStream(lambda: self._stub.RunStream(
            request, timeout=deadline, metadata=self.target.metadata(token)), self.retry)

    async def generate(self, prompt: PromptLike, *, sampling: SamplingLike = None, model: str = "",
                       deadline: float | None = None, raw: bool = False, token: str | None = None) -> t.Generation:
        return convert.generation(await self._unary(self._stub.Generate, generate_request(
            prompt, sampling=sampling, model=model, raw=raw), deadline, token))

    async def score(self, prompt: PromptLike, candidates: Sequence[str], *, kind: str = "outcome",
                    step_separator: str = "", model: str = "", deadline: float | None = None, raw: bool = False,
                    token: str | None = None) -> t.Scores:
        return convert.scores(await self._unary(self._stub.Score, score_request(
            prompt, candidates, kind=kind, step_separator=step_separator, model=model, raw=raw), deadline, token))

    async def catalog(self, deadline: float | None = 30.0, token: str | None = None) -> t.Catalog:
        return convert.catalog(await self._unary(self._stub.ListControllers, router_pb2.ListControllersRequest(),
                                                 deadline, token))

    async def controllers(self, deadline: float | None = 30.0, token: str | None = None) -> list[t.ControllerInfo]:
        return (await self.catalog(deadline, token)).controllers

    def session(self, deadline: float | None = None, token: str | None = None) -> AsyncSession:
        return AsyncSession(self._stub, self.target.metadata(token), deadline)

    async def serving(self, timeout: float = 1.0) -> bool:
        try:
            reply = await health_pb2_grpc.HealthStub(self._channel).Check(
                health_pb2.HealthCheckRequest(service=ROUTER_SERVICE), timeout=timeout)
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
