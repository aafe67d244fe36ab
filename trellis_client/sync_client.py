"""The blocking client: `Client(address).run("majority_vote", "What is 12 + 7?", params={"n": 8})`."""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
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
from trellis_rpc.tls import ClientTLS
from trellis_rpc.v1 import router_pb2, router_pb2_grpc

T = TypeVar("T")
ROUTER_SERVICE = "trellis.v1.Router"


class EventStream:
    """The events of one run as they arrive; iterate it, or call result(). Leaving it (break, close(), the end of
    a `with` block, or dropping the last reference) cancels the run on the router, which frees the workers' KV."""

    def __init__(self, start: Callable[[], Any], retry: Retry | None) -> None:
        self._start = start
        self._retry = retry
        self._attempt = 1
        self._received = False
        self._call = self._open()
        self.result_: t.Result | None = None

    def _open(self):
        while True:
            try:
                return self._start()
            except grpc.RpcError as err:    # the sync API raises some refusals at the call itself
                self._backoff(TrellisError.from_rpc_error(err))

    def _backoff(self, err: TrellisError) -> None:
        wait = None if self._retry is None or self._received else self._retry.wait(err, self._attempt)
        if wait is None:
            raise err from None
        time.sleep(wait)
        self._attempt += 1

    def __iter__(self) -> Iterator[t.Event]:
        return self

    def __next__(self) -> t.Event:
        while True:
            try:
                message = next(self._call)
            except StopIteration:
                raise
            except grpc.RpcError as err:
                self._backoff(TrellisError.from_rpc_error(err))
                self._call = self._open()
                continue
            self._received = True
            event = convert.event(message)
            if event is None:
                continue
            if isinstance(event, t.Final):
                self.result_ = event.result
            return event

    def result(self) -> t.Result:
        """Read the rest of the stream and return the run's result."""
        for _ in self:
            pass
        if self.result_ is None:
            raise TrellisError(grpc.StatusCode.UNKNOWN, "the stream ended without a result")
        return self.result_

    def cancel(self) -> None:
        self._call.cancel()

    close = cancel

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()

    def __del__(self) -> None:
        call = getattr(self, "_call", None)
        if call is not None:
            call.cancel()


class RunHandle:
    """One run of a Session: its events (each can be read any number of times), its result, its cancellation."""

    def __init__(self, session: Session, run_id: str) -> None:
        self.session = session
        self.run_id = run_id
        self._history: list[t.Event] = []
        self._changed = threading.Condition()
        self.outcome: t.Final | t.Failed | None = None

    def _put(self, event: t.Event) -> None:
        with self._changed:
            if isinstance(event, t.Final | t.Failed):
                self.outcome = event
            self._history.append(event)
            self._changed.notify_all()

    def events(self) -> Iterator[t.Event]:
        """Every event of this run from its start, ending with Final or Failed."""
        i = 0
        while True:
            with self._changed:
                while len(self._history) <= i:
                    self._changed.wait()
                event = self._history[i]
            i += 1
            yield event
            if isinstance(event, t.Final | t.Failed):
                return

    def result(self, timeout: float | None = None) -> t.Result:
        """Wait for the run's end; raises its TrellisError if it failed."""
        with self._changed:
            if not self._changed.wait_for(lambda: self.outcome is not None, timeout):
                raise TimeoutError(f"run {self.run_id} not done after {timeout} s")
        if isinstance(self.outcome, t.Failed):
            raise self.outcome.error
        return self.outcome.result

    def cancel(self) -> None:
        self.session.cancel(self.run_id)


_CLOSE = object()


class Session:
    """Many runs over one bidirectional stream (Router.Session): submit() starts one and returns its handle at
    once; a failed run fails alone. Leaving the `with` block waits for the runs started to finish, or cancels
    them all when the block raised."""

    def __init__(self, stub: router_pb2_grpc.RouterStub, metadata: tuple, timeout: float | None) -> None:
        self._requests: queue.Queue = queue.Queue()
        self._runs: dict[str, RunHandle] = {}
        self._lock = threading.Lock()
        self._call = stub.Session(iter(self._requests.get, _CLOSE), metadata=metadata, timeout=timeout)
        self.error: TrellisError | None = None
        self._reader = threading.Thread(target=self._read, name="trellis-session", daemon=True)
        self._reader.start()

    def submit(self, controller: str, prompt: PromptLike, *, params: Mapping[str, Any] | None = None,
               sampling: SamplingLike = None, model: str = "", priority: int = 0, run_id: str = "",
               stream_tokens: bool = True, raw: bool = False, system: str = "") -> RunHandle:
        run_id = run_id or uuid.uuid4().hex
        request = run_request(controller, prompt, params=params, sampling=sampling, model=model, priority=priority,
                              run_id=run_id, stream_tokens=stream_tokens, raw=raw, system=system)
        with self._lock:
            if self.error is not None:
                raise self.error
            handle = self._runs[run_id] = RunHandle(self, run_id)
        self._requests.put(router_pb2.SessionRequest(run=request))
        return handle

    def cancel(self, run_id: str) -> None:
        self._requests.put(router_pb2.SessionRequest(cancel=router_pb2.CancelRun(run_id=run_id)))

    def _read(self) -> None:
        try:
            for message in self._call:
                event = convert.event(message)
                handle = self._runs.get(message.run_id)
                if event is not None and handle is not None:
                    handle._put(event)
        except grpc.RpcError as err:
            with self._lock:
                self.error = TrellisError.from_rpc_error(err)
        finally:
            with self._lock:
                error = self.error or TrellisError(grpc.StatusCode.UNAVAILABLE, "the session ended before this run")
                for handle in self._runs.values():
                    if handle.outcome is None:
                        handle._put(t.Failed(handle.run_id, 0.0, error))

    def close(self, cancel: bool = False) -> None:
        """Half-close: the router finishes the runs started, then ends the stream. cancel=True ends them now."""
        if cancel:
            self._call.cancel()
        self._requests.put(_CLOSE)
        self._reader.join()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.close(cancel=exc_type is not None)


class Client:
    """A blocking client of one router. Thread-safe; open one per process and share it.

    address: host:port (None: env TRELLIS_ROUTER, else 127.0.0.1:50051). tls: a ClientTLS, True (the system's
    roots) or a CA file. token: the bearer token of a router with --auth-file (None: env TRELLIS_TOKEN).
    retry: opt-in retry of RESOURCE_EXHAUSTED/UNAVAILABLE before anything streamed (True, an attempt count, or
    a Retry), waiting as long as the router's RetryInfo says. Every call carries the caller's active
    OpenTelemetry span as its trace parent. `deadline` arguments are seconds from the call.
    """

    def __init__(self, address: str | None = None, *, tls: ClientTLS | bool | str | Path | None = None,
                 token: str | None = None, retry: Retry | bool | int | None = None) -> None:
        self.target = Target.of(address, tls, token)
        self.retry = policy(retry)
        self._channel = self.target.channel()
        self._stub = router_pb2_grpc.RouterStub(self._channel)

    @property
    def address(self) -> str:
        return self.target.address

    def _unary(self, method: Callable[..., T], request: object, deadline: float | None, token: str | None) -> T:
        attempt = 1
        while True:
            try:
                return method(request, timeout=deadline, metadata=self.target.metadata(token))
            except grpc.RpcError as err:
                error = TrellisError.from_rpc_error(err)
                wait = None if self.retry is None else self.retry.wait(error, attempt)
                if wait is None:
                    raise error from None
                time.sleep(wait)
                attempt += 1

    def run(self, controller: str, prompt: PromptLike, *, params: Mapping[str, Any] | None = None,
            sampling: SamplingLike = None, model: str = "", priority: int = 0, deadline: float | None = None,
            run_id: str = "", raw: bool = False, system: str = "", token: str | None = None) -> t.Result:
        """Run a controller to completion (Router.Run)."""
        request = run_request(controller, prompt, params=params, sampling=sampling, model=model, priority=priority,
                              run_id=run_id, stream_tokens=False, raw=raw, system=system)
        return convert.result(self._unary(self._stub.Run, request, deadline, token))

    def stream(self, controller: str, prompt: PromptLike, *, params: Mapping[str, Any] | None = None,
               sampling: SamplingLike = None, model: str = "", priority: int = 0, deadline: float | None = None,
               run_id: str = "", stream_tokens: bool = True, raw: bool = False, system: str = "",
               token: str | None = None) -> EventStream:
        """Run a controller, streaming its events (Router.RunStream); stream_tokens=False leaves out the deltas."""
        request = run_request(controller, prompt, params=params, sampling=sampling, model=model, priority=priority,
                              run_id=run_id, stream_tokens=stream_tokens, raw=raw, system=system)
        return EventStream(lambda: self._stub.RunStream(request, timeout=deadline,
                                                        metadata=self.target.metadata(token)), self.retry)

    def generate(self, prompt: PromptLike, *, sampling: SamplingLike = None, model: str = "",
                 deadline: float | None = None, raw: bool = False, token: str | None = None) -> t.Generation:
        """One worker task, no controller (Router.Generate): sampling.n completions of the prompt."""
        return convert.generation(self._unary(self._stub.Generate, generate_request(
            prompt, sampling=sampling, model=model, raw=raw), deadline, token))

    def score(self, prompt: PromptLike, candidates: Sequence[str], *, kind: str = "outcome",
              step_separator: str = "", model: str = "", deadline: float | None = None, raw: bool = False,
              token: str | None = None) -> t.Scores:
        """Score candidate answers to a prompt with a reward model or verifier (Router.Score)."""
        return convert.scores(self._unary(self._stub.Score, score_request(
            prompt, candidates, kind=kind, step_separator=step_separator, model=model, raw=raw), deadline, token))

    def catalog(self, deadline: float | None = 30.0, token: str | None = None) -> t.Catalog:
        """The controllers this caller may run, with their parameters, and the models served now."""
        return convert.catalog(self._unary(self._stub.ListControllers, router_pb2.ListControllersRequest(),
                                           deadline, token))

    def controllers(self, deadline: float | None = 30.0, token: str | None = None) -> list[t.ControllerInfo]:
        return self.catalog(deadline, token).controllers

    def session(self, deadline: float | None = None, token: str | None = None) -> Session:
        return Session(self._stub, self.target.metadata(token), deadline)

    def serving(self, timeout: float = 1.0) -> bool:
        """Whether the router answers its health check with SERVING."""
        try:
            reply = health_pb2_grpc.HealthStub(self._channel).Check(
                health_pb2.HealthCheckRequest(service=ROUTER_SERVICE), timeout=timeout)
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
