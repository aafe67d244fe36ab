"""A run from request to result: validated, admitted, its controller driven against the workers, recorded.

`Runs.prepare` checks a RunRequest (controller, prompt, sampling, parameters, the router's and the client's
limits) and reserves the run's place with admission; `Runs.execute` waits for the place, drives the
controller through a RemoteRunner in the run's span, and records how it ended (one log line, metrics, span
totals) however it ended.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import structlog
from opentelemetry import trace

from controllers import (
    REGISTRY,
    Controller,
    ControllerError,
    ParamError,
    Prompt,
    Reallocation,
    Result,
    controller_class,
)
from controllers.runtime import drive
from router import metrics
from router.admission import Admission, Ticket
from router.auth import ClientPolicy
from router.convert import event_to_pb, prompt_from_pb, result_to_pb, struct_to_dict
from router.dispatch import RemoteRunner, step_span
from router.limits import Limits
from router.outcomes import outcome, status_code
from router.pool import WorkerPool
from trellis_rpc.errors import StatusError, invalid
from trellis_rpc.sampling import check_prompt, resolve_sampling
from trellis_rpc.telemetry import tracer
from trellis_rpc.v1 import router_pb2

log = structlog.get_logger(__name__)
_tracer = tracer(__name__)

# Receives a RunEvent's oneof field as keyword arguments ({"progress": ...}, {"delta": ...}).
Emit = Callable[[dict], None]


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


class Runs:
    def __init__(self, pool: WorkerPool, limits: Limits, admission: Admission, worker_wait_s: float,
                 max_migrations: int, reallocation: Reallocation | None = None) -> None:
        self.pool = pool
        self.limits = limits
        self.admission = admission
        self.worker_wait_s = worker_wait_s
        self.max_migrations = max_migrations
        self.reallocation = reallocation     # offered to every run's controller (certaindex), when configured

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
            self.limits.check_amounts(request.prompt, request.sampling, prefix, client)
            controller = cls.from_params(struct_to_dict(request.params), limits={"n": self.limits.max_n_for(client)},
                                         prefix=f"{prefix}params")
            controller.reallocation = self.reallocation
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

    async def execute(self, run: PreparedRun, deadline: float | None, emit: Emit) -> router_pb2.RunResult:
        """Run the controller once admitted; controller events and (if asked) token deltas go to emit as they happen."""
        try:
            await run.ticket.admitted.wait()
            return await self._execute(run, deadline, emit)
        finally:
            self.release(run)

    def release(self, run: PreparedRun) -> None:
        """Give up the run's place (also when it was cancelled before it started); releasing twice is harmless."""
        self.admission.release(run.ticket)

    async def _execute(self, run: PreparedRun, deadline: float | None, emit: Emit) -> router_pb2.RunResult:
        runner = RemoteRunner(self.pool, run.run_id, run.request.model, run.request.sampling, deadline=deadline,
                              limits=self.limits.for_run(run.client), worker_wait_s=self.worker_wait_s,
                              max_migrations=self.max_migrations, priority=run.request.priority)
        span = _tracer.start_span("router.run", context=run.trace_parent, attributes={
            "trellis.run_id": run.run_id, "trellis.controller": run.controller.name})
        # The run's log lines carry its run_id (and, inside the span, its trace and span ids).
        with trace.use_span(span, end_on_exit=True, record_exception=False, set_status_on_exception=False), \
                structlog.contextvars.bound_contextvars(run_id=run.run_id):
            try:
                with outcome(span) as ended:
                    result = await self._drive(run, runner, emit)
            finally:
                runner.release_kept()
                self._record_run(run, runner, ended.code, span)
        ttft = (runner.usage.first_token - run.accepted) * 1000 if runner.usage.first_token else 0.0
        timings = router_pb2.RunTimings(queue_ms=run.ticket.waited_ms, ttft_ms=ttft,
                                        total_ms=(time.monotonic() - run.accepted) * 1000)
        return result_to_pb(run.run_id, run.controller.name, result, runner.usage.pb(), timings)

    @staticmethod
    async def _drive(run: PreparedRun, runner: RemoteRunner, emit: Emit) -> Result:
        """The controller's result; how it failed as a StatusError."""
        def on_delta(branch: str, text: str, count: int) -> None:
            if run.request.stream_tokens:
                emit({"delta": router_pb2.BranchDelta(branch=branch, text=text, token_count=count)})

        try:
            return await drive(run.controller, run.prompt, runner, lambda e: emit(event_to_pb(e)), on_delta, step_span)
        except ControllerError as err:
            raise StatusError(status_code(err.code), err.message, err.field, err.reason) from err
        except ParamError as err:
            raise invalid(err.field, err.message) from err

    @staticmethod
    def _record_run(run: PreparedRun, runner: RemoteRunner, code: str, span: trace.Span) -> None:
        """One INFO line per run, its metrics and its span's totals, however it ended."""
        usage, controller = runner.usage, run.controller.name
        total_s = time.monotonic() - run.accepted
        ttft_s = usage.first_token - run.accepted if usage.first_token else None
        span.set_attributes({"trellis.outcome": code, "trellis.tasks": usage.tasks,
                             "trellis.prompt_tokens": usage.prompt_tokens,
                             "trellis.completion_tokens": usage.completion_tokens,
                             "trellis.migrations": usage.migrations})
        metrics.runs.add(1, controller, code)
        metrics.run_duration.record(total_s, {"controller": controller})
        if ttft_s is not None:
            metrics.run_ttft.record(ttft_s, {"controller": controller})
        metrics.prompt_tokens.add(usage.prompt_tokens)
        metrics.completion_tokens.add(usage.completion_tokens)
        log.info("run", controller=controller, outcome=code, total_ms=round(total_s * 1000, 1),
                 queue_ms=round(run.ticket.waited_ms, 1) if run.ticket else 0.0,
                 ttft_ms=round(ttft_s * 1000, 1) if ttft_s is not None else None, tasks=usage.tasks,
                 migrations=usage.migrations, prompt_tokens=usage.prompt_tokens,
                 completion_tokens=usage.completion_tokens)
