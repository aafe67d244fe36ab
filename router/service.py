"""The public Router service: each RPC identifies its caller and hands the request to the part that serves it
(router/runs.py: a run's lifecycle; router/events.py: a run as a stream; router/session.py: many runs on one
stream; router/dispatch.py: one task sent straight to a worker). A StatusError ends the RPC with its code,
message and rich details (router/rich_status.py)."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator

import grpc
from opentelemetry import trace

from controllers import REGISTRY, Reallocation
from router import metrics
from router.admission import Admission
from router.auth import Authenticator, ClientPolicy, identify
from router.convert import controller_spec_pb
from router.dispatch import dispatch, task_outcome
from router.events import run_events
from router.limits import Limits
from router.pool import WorkerPool
from router.rich_status import abort
from router.runs import Runs
from router.session import Session
from trellis_rpc.errors import StatusError
from trellis_rpc.sampling import check_prompt, resolve_sampling
from trellis_rpc.scoring import CAPABILITY_OF_KIND, check_score_request
from trellis_rpc.telemetry import extract, traced_parent, tracer
from trellis_rpc.v1 import common_pb2, router_pb2, router_pb2_grpc, worker_pb2

_tracer = tracer(__name__)


class RouterService(router_pb2_grpc.RouterServicer):
    def __init__(self, pool: WorkerPool, limits: Limits | None = None, admission: Admission | None = None,
                 auth: Authenticator | None = None, worker_wait_s: float = 2.0, max_migrations: int = 2,
                 certainty: float = 0.0) -> None:
        """certainty > 0: offer controllers reallocation (certaindex) at that certainty while the router is short of
        capacity (runs wait for admission or tasks wait at workers)."""
        self.pool = pool
        metrics.watch(self)
        self.limits = limits or Limits()
        self.admission = admission or Admission()
        self.auth = auth
        self.worker_wait_s = worker_wait_s
        offer = Reallocation(self.under_load, certainty) if certainty > 0 else None
        self.runs = Runs(pool, self.limits, self.admission, worker_wait_s, max_migrations, offer)

    def under_load(self) -> bool:
        return self.admission.queued > 0 or self.pool.queued() > 0

    def caller(self, context: grpc.aio.ServicerContext) -> ClientPolicy:
        return identify(context, self.auth)

    async def Run(self, request: router_pb2.RunRequest, context: grpc.aio.ServicerContext) -> router_pb2.RunResult:
        try:
            run = self.runs.prepare(request, client=self.caller(context))
            run.trace_parent = extract(context.invocation_metadata())
            return await self.runs.execute(run, self.limits.deadline(context), lambda _fields: None)
        except StatusError as err:
            await abort(context, err)

    async def RunStream(self, request: router_pb2.RunRequest,
                        context: grpc.aio.ServicerContext) -> AsyncIterator[router_pb2.RunEvent]:
        try:
            run = self.runs.prepare(request, client=self.caller(context))
            run.trace_parent = extract(context.invocation_metadata())
            async for event in run_events(self.runs, run, self.limits.deadline(context)):
                yield event
        except StatusError as err:
            await abort(context, err)

    async def Session(self, request_iterator: AsyncIterator[router_pb2.SessionRequest],
                      context: grpc.aio.ServicerContext) -> AsyncIterator[router_pb2.RunEvent]:
        try:
            client = self.caller(context)
        except StatusError as err:
            await abort(context, err)
            return
        session = Session(self.runs, client, extract(context.invocation_metadata()), self.limits.deadline(context))
        async for event in session.serve(request_iterator):
            yield event

    async def ListControllers(self, request: router_pb2.ListControllersRequest,
                              context: grpc.aio.ServicerContext) -> router_pb2.ListControllersResponse:
        try:
            client = self.caller(context)
        except StatusError as err:
            await abort(context, err)
        allowed = [cls for cls in REGISTRY.values() if client.controllers is None or cls.name in client.controllers]
        return router_pb2.ListControllersResponse(
            controllers=[controller_spec_pb(cls, self.limits.max_n_for(client)) for cls in allowed],
            models=self.pool.models())

    async def Generate(self, request: router_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> common_pb2.GenerateResult:
        try:
            client = self.caller(context)
            check_prompt(request.prompt)
            resolve_sampling(request.sampling, max_n=self.limits.max_n_for(client))
            self.limits.check_amounts(request.prompt, request.sampling, "", client)
            task = worker_pb2.WorkerRequest(
                task_id=f"gen-{uuid.uuid4().hex}", timeout_ms=_timeout_ms(context),
                generate=worker_pb2.GenerateTask(prompt=request.prompt, sampling=request.sampling))
            return await self._direct("generate", context, task, request.model, common_pb2.CAPABILITY_GENERATE)
        except StatusError as err:
            await abort(context, err)

    async def Score(self, request: common_pb2.ScoreRequest,
                    context: grpc.aio.ServicerContext) -> common_pb2.ScoreResult:
        try:
            self.caller(context)
            kind = check_score_request(request)
            task = worker_pb2.WorkerRequest(task_id=f"score-{uuid.uuid4().hex}", timeout_ms=_timeout_ms(context),
                                            score=worker_pb2.ScoreTask(request=request))
            # Routed by capability: a reward model's worker for OUTCOME/PROCESS, a causal LM's for VERIFIER.
            return await self._direct("score", context, task, request.model, CAPABILITY_OF_KIND[kind])
        except StatusError as err:
            await abort(context, err)

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


def _timeout_ms(context: grpc.aio.ServicerContext) -> int:
    """The client's deadline as a worker task's timeout; 0: none."""
    remaining = context.time_remaining()
    return 0 if remaining is None else max(1, int(remaining * 1000))
