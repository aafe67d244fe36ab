"""The public Router service: validates requests, runs controllers, streams their events."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc
import structlog
from google.protobuf import json_format
from opentelemetry import trace

from controllers import REGISTRY, Controller, ControllerError, ParamError, Prompt, controller_class
from controllers.runtime import drive
from router import metrics
from router.admission import Admission, Exhausted, Ticket
from router.auth import Authenticator, ClientPolicy
from router.convert import dict_to_struct, event_to_pb, prompt_from_pb, result_to_pb, struct_to_dict
from router.dispatch import RemoteRunner, dispatch, step_span, task_outcome
from router.pool import WorkerPool
from router.rich_status import DETAILS_KEY, status_details
from trellis_rpc.errors import StatusError, code_number, invalid
from trellis_rpc.sampling import DEFAULT_MAX_TOKENS, check_prompt, resolve_sampling
from trellis_rpc.scoring import CAPABILITY_OF_KIND, check_score_request
from trellis_rpc.telemetry import extract, traced_parent, tracer
from trellis_rpc.v1 import common_pb2, router_pb2, router_pb2_grpc, worker_pb2

log = structlog.get_logger(__name__)
_tracer = tracer(__name__)

Emit = Callable[[dict], None]
_DONE = object()


@dataclass
class PreparedRun:
    run_id: str
    request: router_pb2.RunRequest
    controller: Controller
    prompt: Prompt
    accepted: float
    ticket: Ticket | None = None
    trace_parent: object = None          # the caller's trace context (W3C, from gRPC metadata)
    client: ClientPolicy = ClientPolicy("")


def coalesce(events: list[router_pb2.RunEvent]) -> list[router_pb2.RunEvent]:
    """Events that queued up while the client was being written to, with each branch's token deltas
    merged into one message (text joined, counts summed). Other events keep their place: deltas before
    an event are sent before it. One message per token costs the router ~100 us each; under load this
    keeps a slow reader from falling ever further behind."""
    if len(events) < 2:
        return events
    out: list[router_pb2.RunEvent] = []
    pending: dict[str, router_pb2.RunEvent] = {}
    for event in events:
        if event.WhichOneof("event") != "delta":
            out.extend(pending.values())
            pending.clear()
            out.append(event)
            continue
        merged = pending.get(event.delta.branch)
        if merged is None:
            pending[event.delta.branch] = event
        else:
            merged.delta.text += event.delta.text
            merged.delta.token_count += event.delta.token_count
            merged.elapsed_ms = event.elapsed_ms
    out.extend(pending.values())
    return out


def _status_of(name: str) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, name, grpc.StatusCode.UNKNOWN)


def _lowest(*limits: int | None) -> int:
    """The tightest of some limits (0 or None: no limit); 0 when none applies."""
    return min((x for x in limits if x), default=0)


def _client(context: grpc.aio.ServicerContext) -> str:
    """Who is calling, for per-client limits: the x-trellis-client metadata, else the peer's host."""
    for key, value in context.invocation_metadata() or ():
        if key == "x-trellis-client":
            return value
    return (context.peer() or "").rsplit(":", 1)[0]


async def _abort(context: grpc.aio.ServicerContext, err: StatusError) -> None:
    retry_after_ms = err.retry_after_ms if isinstance(err, Exhausted) else 0
    trailers = [("retry-after-ms", str(retry_after_ms))] if retry_after_ms else []
    details = status_details(err, retry_after_ms)
    if details is not None:
        trailers.append((DETAILS_KEY, details))
    if trailers:
        context.set_trailing_metadata(tuple(trailers))
    await context.abort(err.code, err.message)


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


@dataclass(frozen=True)
class Limits:
    """What one request may ask for, whoever asks (a client's auth entry may lower them). 0: no limit."""

    max_n: int = 64
    max_tokens: int = 0               # per generate task
    max_prompt_chars: int = 0         # the router has no tokenizer; workers check tokens against the context
    max_run_s: float = 0.0            # caps the client's deadline
    max_tasks_per_run: int = 0        # bounds a search's tree


class RouterService(router_pb2_grpc.RouterServicer):
    def __init__(self, pool: WorkerPool, max_n: int = 64, worker_wait_s: float = 2.0, max_migrations: int = 2,
                 admission: Admission | None = None, auth: Authenticator | None = None,
                 limits: Limits | None = None) -> None:
        self.pool = pool
        metrics.watch(self)
        self.max_migrations = max_migrations
        self.admission = admission or Admission()
        self.limits = limits or Limits(max_n=max_n)
        self.max_n = self.limits.max_n
        self.worker_wait_s = worker_wait_s
        self.auth = auth

    def caller(self, context: grpc.aio.ServicerContext) -> ClientPolicy:
        """Who is calling: an authenticated client when --auth-file is set (UNAUTHENTICATED otherwise), else
        an open policy named by x-trellis-client or the peer's host."""
        if self.auth is not None:
            return self.auth.identify(context)
        return ClientPolicy(_client(context))

    def _deadline(self, context: grpc.aio.ServicerContext) -> float | None:
        deadline = _deadline(context)
        if self.limits.max_run_s:
            cap = time.monotonic() + self.limits.max_run_s
            deadline = cap if deadline is None else min(deadline, cap)
        return deadline

    def _check_amounts(self, prompt: common_pb2.Prompt, sampling: common_pb2.SamplingParams, prefix: str,
                       client: ClientPolicy) -> None:
        """Prompt size and max_tokens against the router's limits and the client's."""
        if self.limits.max_prompt_chars:
            kind = prompt.WhichOneof("kind")
            size = (len(prompt.text) if kind == "text" else len(prompt.token_ids.ids) if kind == "token_ids"
                    else sum(len(m.content) for m in prompt.chat.messages))
            if size > self.limits.max_prompt_chars:
                raise StatusError(grpc.StatusCode.INVALID_ARGUMENT, f"{prefix}prompt: {size} characters (or tokens), "
                                  f"more than this router's limit of {self.limits.max_prompt_chars}", f"{prefix}prompt")
        cap = _lowest(self.limits.max_tokens, client.max_tokens)
        asked = sampling.max_tokens if sampling.HasField("max_tokens") else DEFAULT_MAX_TOKENS
        if cap and asked > cap:
            field = f"{prefix}sampling.max_tokens"
            code = grpc.StatusCode.PERMISSION_DENIED if client.max_tokens == cap else grpc.StatusCode.INVALID_ARGUMENT
            who = f"client {client.name!r}" if code == grpc.StatusCode.PERMISSION_DENIED else "this router"
            raise StatusError(code, f"{field}: {asked} is over {who}'s limit of {cap}"
                                    + ("" if sampling.HasField("max_tokens") else " (the default; set max_tokens)"),
                              field)

    # ---- validation ------------------------------------------------------------------------

    def prepare(self, request: router_pb2.RunRequest, prefix: str = "",
                client: ClientPolicy | None = None) -> PreparedRun:
        """Validate the run, then reserve its place (RESOURCE_EXHAUSTED when the router or the client is full)."""
        try:
            return self._prepare(request, prefix, client or ClientPolicy(""))
        except StatusError as err:
            # Counted with the runs that ended, under their status code; a name nobody registered is not a label.
            name = request.controller if request.controller in REGISTRY else "unknown"
            metrics.runs.add(1, name, err.code.name)
            raise

    def _prepare(self, request: router_pb2.RunRequest, prefix: str, client: ClientPolicy) -> PreparedRun:
        try:
            cls = controller_class(request.controller)
            client.check_controller(request.controller, f"{prefix}controller")
            check_prompt(request.prompt, f"{prefix}prompt")
            resolve_sampling(request.sampling, max_n=1, prefix=f"{prefix}sampling")
            self._check_amounts(request.prompt, request.sampling, prefix, client)
            controller = cls.from_params(struct_to_dict(request.params),
                                         limits={"n": _lowest(self.max_n, client.max_n)}, prefix=f"{prefix}params")
        except ParamError as err:
            field = err.field if err.field.startswith(prefix) else prefix + err.field
            raise invalid(field, err.message) from err
        except StatusError as err:
            if err.field == f"{prefix}sampling.n":
                raise invalid(err.field, "a run takes its sample count from the controller (params.n); "
                                         "leave sampling.n unset or 1") from err
            raise
        return PreparedRun(run_id=request.run_id or uuid.uuid4().hex, request=request, controller=controller,
                           prompt=prompt_from_pb(request.prompt), accepted=time.monotonic(),
                           ticket=self.admission.reserve(request.priority, client.name,
                                                         client.max_concurrent_runs or 0), client=client)

    # ---- running ---------------------------------------------------------------------------

    async def execute(self, run: PreparedRun, deadline: float | None, emit: Emit) -> router_pb2.RunResult:
        """Run the controller once admitted; controller events and (if asked) token deltas go to emit as they happen."""
        try:
            await run.ticket.admitted.wait()
            return await self._execute(run, deadline, emit)
        finally:
            self.admission.release(run.ticket)

    async def _execute(self, run: PreparedRun, deadline: float | None, emit: Emit) -> router_pb2.RunResult:
        req = run.request
        runner = RemoteRunner(self.pool, run.run_id, req.model, req.sampling, deadline, self.worker_wait_s,
                              self.max_migrations, self.limits.max_tasks_per_run,
                              _lowest(self.limits.max_tokens, run.client.max_tokens),
                              _lowest(self.max_n, run.client.max_n))

        def on_delta(branch: str, text: str, count: int) -> None:
            if req.stream_tokens:
                emit({"delta": router_pb2.BranchDelta(branch=branch, text=text, token_count=count)})

        outcome = "OK"
        span = _tracer.start_span("router.run", context=run.trace_parent, attributes={
            "trellis.run_id": run.run_id, "trellis.controller": run.controller.name})
        # The run's log lines carry its run_id (and, inside the span, its trace and span ids).
        with trace.use_span(span, end_on_exit=True, record_exception=False, set_status_on_exception=False), \
                structlog.contextvars.bound_contextvars(run_id=run.run_id):
            try:
                result = await drive(run.controller, run.prompt, runner, lambda e: emit(event_to_pb(e)), on_delta,
                                     step_span)
            except ControllerError as err:
                outcome = _status_of(err.code).name
                span.set_status(trace.Status(trace.StatusCode.ERROR, f"{outcome}: {err.message}"))
                raise StatusError(_status_of(err.code), err.message, err.field, err.reason) from err
            except ParamError as err:
                outcome = "INVALID_ARGUMENT"
                span.set_status(trace.Status(trace.StatusCode.ERROR, f"{outcome}: {err.message}"))
                raise invalid(err.field, err.message) from err
            except asyncio.CancelledError:
                outcome = "CANCELLED"
                raise
            except Exception as err:
                outcome = "INTERNAL"
                span.set_status(trace.Status(trace.StatusCode.ERROR, f"{outcome}: {err!r}"))
                raise
            finally:
                runner.release_kept()
                self._record_run(run, runner, outcome, span)
        ttft = (runner.usage.first_token - run.accepted) * 1000 if runner.usage.first_token else 0.0
        timings = router_pb2.RunTimings(queue_ms=run.ticket.waited_ms, ttft_ms=ttft,
                                        total_ms=(time.monotonic() - run.accepted) * 1000)
        return result_to_pb(run.run_id, run.controller.name, result, runner.usage.pb(), timings)

    @staticmethod
    def _record_run(run: PreparedRun, runner: RemoteRunner, outcome: str, span: trace.Span) -> None:
        """One INFO line per run, its metrics and its span's totals, however it ended."""
        usage, controller = runner.usage, run.controller.name
        total_s = time.monotonic() - run.accepted
        ttft_s = usage.first_token - run.accepted if usage.first_token else None
        span.set_attributes({"trellis.outcome": outcome, "trellis.tasks": usage.tasks,
                             "trellis.prompt_tokens": usage.prompt_tokens,
                             "trellis.completion_tokens": usage.completion_tokens,
                             "trellis.migrations": usage.migrations})
        metrics.runs.add(1, controller, outcome)
        metrics.run_duration.record(total_s, {"controller": controller})
        if ttft_s is not None:
            metrics.run_ttft.record(ttft_s, {"controller": controller})
        metrics.prompt_tokens.add(usage.prompt_tokens)
        metrics.completion_tokens.add(usage.completion_tokens)
        log.info("run", controller=controller, outcome=outcome, total_ms=round(total_s * 1000, 1),
                 queue_ms=round(run.ticket.waited_ms, 1) if run.ticket else 0.0,
                 ttft_ms=round(ttft_s * 1000, 1) if ttft_s is not None else None, tasks=usage.tasks,
                 migrations=usage.migrations, prompt_tokens=usage.prompt_tokens,
                 completion_tokens=usage.completion_tokens)

    def _event(self, run: PreparedRun, **fields) -> router_pb2.RunEvent:
        return router_pb2.RunEvent(run_id=run.run_id, elapsed_ms=(time.monotonic() - run.accepted) * 1000, **fields)

    async def _events(self, run: PreparedRun, deadline: float | None) -> AsyncIterator[router_pb2.RunEvent]:
        """started, then controller events as they happen, then the result. Raises StatusError on failure;
        closing the iterator early cancels the run and every worker task under it."""
        queue: asyncio.Queue = asyncio.Queue()
        yield self._event(run, started=router_pb2.RunStarted(
            controller=run.controller.name, params=dict_to_struct(run.controller.param_values())))
        emit = lambda fields: queue.put_nowait(self._event(run, **fields))  # noqa: E731
        task = asyncio.create_task(self.execute(run, deadline, emit))
        task.add_done_callback(lambda _t: queue.put_nowait(_DONE))
        try:
            done = False
            while not done:
                batch = [await queue.get()]
                while not queue.empty():
                    batch.append(queue.get_nowait())
                done = batch[-1] is _DONE
                for item in coalesce(batch[:-1] if done else batch):
                    yield item
            yield self._event(run, result=task.result())
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            self.admission.release(run.ticket)  # also when the task was cancelled before it started

    # ---- RPCs ------------------------------------------------------------------------------

    async def Run(self, request: router_pb2.RunRequest, context: grpc.aio.ServicerContext) -> router_pb2.RunResult:
        try:
            run = self.prepare(request, client=self.caller(context))
            run.trace_parent = extract(context.invocation_metadata())
            return await self.execute(run, self._deadline(context), lambda _fields: None)
        except StatusError as err:
            await _abort(context, err)

    async def RunStream(self, request: router_pb2.RunRequest,
                        context: grpc.aio.ServicerContext) -> AsyncIterator[router_pb2.RunEvent]:
        try:
            run = self.prepare(request, client=self.caller(context))
            run.trace_parent = extract(context.invocation_metadata())
            async for event in self._events(run, self._deadline(context)):
                yield event
        except StatusError as err:
            await _abort(context, err)

    async def Session(self, request_iterator: AsyncIterator[router_pb2.SessionRequest],
                      context: grpc.aio.ServicerContext) -> AsyncIterator[router_pb2.RunEvent]:
        out: asyncio.Queue = asyncio.Queue()
        runs: dict[str, asyncio.Task] = {}
        deadline = self._deadline(context)
        try:
            client = self.caller(context)
        except StatusError as err:
            await _abort(context, err)
            return
        parent = extract(context.invocation_metadata())

        def error_event(run_id: str, err: StatusError) -> router_pb2.RunEvent:
            return router_pb2.RunEvent(run_id=run_id, error=router_pb2.RunError(
                code=code_number(err.code), message=err.message, field=err.field, reason=err.reason))

        async def one(run: PreparedRun) -> None:
            try:
                async for event in self._events(run, deadline):
                    out.put_nowait(event)
            except StatusError as err:
                if err.field and not err.field.startswith("run."):
                    # Found once the run was under way (a worker's check): name it as the Session's field.
                    err = StatusError(err.code, f"run.{err.message}" if err.message.startswith(err.field)
                                      else err.message, f"run.{err.field}", err.reason)
                out.put_nowait(error_event(run.run_id, err))
            except asyncio.CancelledError:
                cancelled = StatusError(grpc.StatusCode.CANCELLED, "cancelled by the client")
                out.put_nowait(error_event(run.run_id, cancelled))

        async def read() -> None:
            async for req in request_iterator:
                kind = req.WhichOneof("kind")
                if kind == "run":
                    run_id = req.run.run_id
                    try:
                        if not run_id:
                            raise invalid("run.run_id", "is required in a Session (events are matched by it)")
                        if run_id in runs:
                            raise invalid("run.run_id", f"{run_id!r} is already running in this session")
                        prepared = self.prepare(req.run, prefix="run.", client=client)
                        prepared.trace_parent = parent
                    except StatusError as err:
                        out.put_nowait(error_event(run_id, err))
                        continue
                    task = asyncio.create_task(one(prepared))
                    runs[run_id] = task
                    task.add_done_callback(lambda _t, rid=run_id: runs.pop(rid, None))
                elif kind == "cancel":
                    task = runs.get(req.cancel.run_id)
                    if task is not None:
                        task.cancel()
                    else:
                        out.put_nowait(error_event(req.cancel.run_id, StatusError(
                            grpc.StatusCode.NOT_FOUND, f"cancel.run_id: no running run {req.cancel.run_id!r}",
                            "cancel.run_id")))
                else:   # neither set (or a kind this router does not know): say so rather than drop it
                    out.put_nowait(error_event("", invalid("kind", "one of run or cancel must be set")))
            if runs:  # the client half-closed: finish what it started, then end the stream
                await asyncio.gather(*runs.values(), return_exceptions=True)

        reader = asyncio.create_task(read())
        reader.add_done_callback(lambda _t: out.put_nowait(_DONE))
        try:
            while (item := await out.get()) is not _DONE:
                yield item
            while not out.empty():
                item = out.get_nowait()
                if item is not _DONE:
                    yield item
            if not reader.cancelled() and reader.exception() is not None:
                raise reader.exception()
        finally:
            reader.cancel()
            for task in list(runs.values()):
                task.cancel()

    async def ListControllers(self, request: router_pb2.ListControllersRequest,
                              context: grpc.aio.ServicerContext) -> router_pb2.ListControllersResponse:
        try:
            client = self.caller(context)
        except StatusError as err:
            await _abort(context, err)
        specs = []
        for cls in REGISTRY.values():
            if client.controllers is not None and cls.name not in client.controllers:
                continue
            params = []
            for p in cls.params:
                spec = router_pb2.ParamSpec(name=p.name, type=p.type, description=p.description, choices=p.choices)
                json_format.ParseDict(p.default, spec.default)
                if p.minimum is not None:
                    spec.minimum = p.minimum
                maximum = _lowest(self.max_n, client.max_n) if (p.limit or p.name) == "n" else p.maximum
                if maximum is not None:
                    spec.maximum = maximum
                params.append(spec)
            specs.append(router_pb2.ControllerSpec(name=cls.name, description=cls.description, params=params))
        return router_pb2.ListControllersResponse(controllers=specs)

    async def Generate(self, request: router_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> common_pb2.GenerateResult:
        try:
            client = self.caller(context)
            check_prompt(request.prompt)
            resolve_sampling(request.sampling, max_n=_lowest(self.max_n, client.max_n))
            self._check_amounts(request.prompt, request.sampling, "", client)
            task = worker_pb2.WorkerRequest(
                task_id=f"gen-{uuid.uuid4().hex}", timeout_ms=self._timeout_ms(context),
                generate=worker_pb2.GenerateTask(prompt=request.prompt, sampling=request.sampling))
            return await self._direct("generate", context, task, request.model, common_pb2.CAPABILITY_GENERATE)
        except StatusError as err:
            await _abort(context, err)

    async def Score(self, request: common_pb2.ScoreRequest,
                    context: grpc.aio.ServicerContext) -> common_pb2.ScoreResult:
        try:
            self.caller(context)
            kind = check_score_request(request)
            task = worker_pb2.WorkerRequest(task_id=f"score-{uuid.uuid4().hex}", timeout_ms=self._timeout_ms(context),
                                            score=worker_pb2.ScoreTask(request=request))
            # Routed by capability: a reward model's worker for OUTCOME/PROCESS, a causal LM's for VERIFIER.
            return await self._direct("score", context, task, request.model, CAPABILITY_OF_KIND[kind])
        except StatusError as err:
            await _abort(context, err)

    async def _direct(self, kind: str, context: grpc.aio.ServicerContext, task: worker_pb2.WorkerRequest,
                      model: str, capability: int):
        """One task sent straight to a worker (Router.Generate, Router.Score), in its own span, counted."""
        result_field = f"{kind}_result"
        parent = traced_parent(context.invocation_metadata())
        scope = contextlib.nullcontext(trace.INVALID_SPAN) if parent is None else _tracer.start_as_current_span(
            f"router.{kind}", context=parent, attributes={"trellis.task_id": task.task_id}, record_exception=False,
            set_status_on_exception=False)
        with scope as span, task_outcome(kind, span):
            async for response in dispatch(self.pool, task, model, capability, self.worker_wait_s):
                if response.WhichOneof("kind") == result_field:
                    return getattr(response, result_field)
            raise StatusError(grpc.StatusCode.INTERNAL, "worker ended the task without a result")

    @staticmethod
    def _timeout_ms(context: grpc.aio.ServicerContext) -> int:
        remaining = context.time_remaining()
        return 0 if remaining is None else max(1, int(remaining * 1000))
