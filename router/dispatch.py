"""The router's TaskRunner: sends a controller's generate tasks to workers and streams their tokens back."""

from __future__ import annotations

import contextlib
import itertools
import time
import uuid
from collections.abc import AsyncIterator, Callable, Collection, Iterator

import grpc
from opentelemetry import trace

from controllers import Generate, GenerateOutput, SampleOut, TaskFailure
from controllers.runtime import TaskFailed, TokenSink
from controllers.tasks import Cancel, Score, ScoreOutput, TokenDelta, WaitAny
from router import metrics
from router.convert import prompt_to_pb, sampling_with_overrides
from router.limits import NO_LIMITS, RunLimits
from router.migration import SampleSoFar, migrate
from router.outcomes import outcome
from router.pool import NoWorker, WorkerPool
from router.worker_connection import WorkerConnection
from trellis_rpc.errors import StatusError, code_from_number
from trellis_rpc.finish_reasons import finish_reason_name
from trellis_rpc.sampling import DEFAULT_MAX_TOKENS, derive_seed
from trellis_rpc.scoring import CAPABILITY_OF_KIND, KIND_NAMES, check_score_request
from trellis_rpc.telemetry import inject, tracer
from trellis_rpc.v1 import common_pb2, worker_pb2


def prompt_key(request: worker_pb2.WorkerRequest) -> str:
    """The text whose prefix decides KV-aware routing: the prompt as the worker will see it, roughly
    (chat messages in order; token ids spelled out). Score tasks are not routed by prefix."""
    if request.WhichOneof("kind") != "generate":
        return ""
    prompt = request.generate.prompt
    kind = prompt.WhichOneof("kind")
    if kind == "text":
        return prompt.text
    if kind == "chat":
        return "".join(f"<{m.role}>{m.content}" for m in prompt.chat.messages)
    if kind == "token_ids":
        return ",".join(map(str, prompt.token_ids.ids))
    return ""


async def dispatch(pool: WorkerPool, request: worker_pb2.WorkerRequest, model: str, capability: int,
                   wait_s: float, worker_id: str = "", picked: Callable[[WorkerConnection], None] | None = None,
                   avoid: Collection[str] = (), home: str = "") -> AsyncIterator[worker_pb2.WorkerResponse]:
    """Send one task to a worker of the pool (to worker_id, if given; `picked` hears which; passing over the
    workers in avoid while there is another; home: the address of the run's last worker, which the routing
    policy prefers); yield its responses; a worker error raises StatusError."""
    worker = await pool.pick(model, capability, wait_s=wait_s, worker_id=worker_id, prompt_key=prompt_key(request),
                             avoid=avoid, home=home)
    if picked is not None:
        picked(worker)
    # The span names the last worker tried; a migration's event says why the one before was given up.
    trace.get_current_span().set_attribute("trellis.worker", worker.address)
    request.trace_context.update(inject())
    async for response in worker.submit(request):
        if response.WhichOneof("kind") == "error":
            e = response.error
            raise StatusError(code_from_number(e.code), e.message, e.field, e.reason)
        yield response


# A controller's score kind by name -> ScoreKind on the wire (the inverse of the validation's map).
_SCORE_KINDS = {name: kind for kind, name in KIND_NAMES.items()}

_tracer = tracer(__name__)


@contextlib.contextmanager
def task_outcome(kind: str, span: trace.Span) -> Iterator[None]:
    """Count the task by how it ended (gRPC status code name) and mark its span when it failed."""
    with outcome(span) as ended:
        try:
            yield
        finally:
            metrics.tasks.add(1, kind, ended.code)


def step_span(controller: str, number: int, step: object) -> contextlib.AbstractContextManager:
    """The span of one controller step (controllers.runtime.StepScope): the tasks it starts are its children."""
    if isinstance(step, WaitAny):
        wait, count = "any", len(step.tasks)
    elif isinstance(step, Cancel):
        wait, count = "cancel", len(step.tasks)
    else:
        wait, count = "all", len(step) if isinstance(step, list) else 1
    return _tracer.start_as_current_span("controller.step", attributes={
        "trellis.controller": controller, "trellis.step": number, "trellis.wait": wait, "trellis.tasks": count})


class RunUsage:
    """What one run cost, summed over its tasks."""

    def __init__(self) -> None:
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.tasks = 0
        self.migrations = 0
        self.first_token: float | None = None

    def pb(self) -> common_pb2.Usage:
        return common_pb2.Usage(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
                                tasks=self.tasks)


class RemoteRunner:
    """The router's TaskRunner for one run: its tasks go to workers of the pool, their tokens stream back."""

    def __init__(self, pool: WorkerPool, run_id: str, model: str, sampling: common_pb2.SamplingParams, *,
                 deadline: float | None = None, limits: RunLimits = NO_LIMITS, worker_wait_s: float = 2.0,
                 max_migrations: int = 2, priority: int = 0) -> None:
        """deadline: a time.monotonic() value, or None; limits: what this run's client may ask of workers;
        priority: the run's, told to workers with every task (RunContext) so they schedule by run."""
        self.pool = pool
        self.run_id = run_id
        self.priority = priority
        self.model = model
        self.sampling = sampling
        self.deadline = deadline
        self.limits = limits
        self.worker_wait_s = worker_wait_s
        self.max_migrations = max_migrations
        self.usage = RunUsage()
        self._ids = itertools.count()
        # Task ids must be unique on a worker; run_id is the client's and two runs may share one.
        self.task_prefix = f"{run_id}.{uuid.uuid4().hex[:8]}"
        # Workers that ran a task asked to keep its sequences: told to release them when the run ends.
        self.kept_on: dict[str, WorkerConnection] = {}
        self.home = ""      # the address of the worker that took the run's last generate task

    def _next_task(self) -> int:
        number, limit = next(self._ids), self.limits.max_tasks
        if limit and number >= limit:
            raise TaskFailed(TaskFailure("RESOURCE_EXHAUSTED", f"this run has started its limit of {limit} "
                                                               f"tasks (the router's --max-tasks-per-run)"))
        return number

    def _timeout_ms(self) -> int:
        if self.deadline is None:
            return 0
        return max(1, int((self.deadline - time.monotonic()) * 1000))

    async def generate(self, task: Generate, on_token: TokenSink) -> GenerateOutput:
        # Checked before anything is allocated per sample: n comes from controller code, which may not have
        # marked the parameter it derives n from as limited by the router's n cap.
        max_n = self.limits.max_n
        if not 1 <= task.n <= (max_n or task.n):
            raise TaskFailed(TaskFailure("RESOURCE_EXHAUSTED", f"a task asked for n={task.n} samples; this run's "
                                                               f"limit is 1 to {max_n or 'any'}"))
        number = self._next_task()
        sampling = sampling_with_overrides(self.sampling, task.sampling, task.n)
        asked = sampling.max_tokens if sampling.HasField("max_tokens") else DEFAULT_MAX_TOKENS
        if self.limits.max_tokens and asked > self.limits.max_tokens:
            raise TaskFailed(TaskFailure("PERMISSION_DENIED", f"sampling.max_tokens: {asked} is over this run's limit "
                                                              f"of {self.limits.max_tokens}", "sampling.max_tokens"))
        if sampling.HasField("seed") and "seed" not in task.sampling and number:
            # A seeded run stays reproducible, but its tasks must not all draw the same samples: the
            # worker seeds sample i of a task from (seed, i), so n separate n=1 tasks would be copies.
            sampling.seed = derive_seed(sampling.seed, number)
        generate = worker_pb2.GenerateTask(
            prompt=prompt_to_pb(task.prompt), stream=True, branch=task.branch, sampling=sampling)
        if task.keep_s > 0:
            generate.keep.keep = True
            generate.keep.ttl_ms = int(task.keep_s * 1000)
        if task.continue_from:
            generate.continue_from.handle = task.continue_from
        elif task.fork_from:
            generate.fork_from.handle = task.fork_from
        request = worker_pb2.WorkerRequest(task_id=f"{self.task_prefix}/{number}", timeout_ms=self._timeout_ms(),
                                           run=self._run_context(), generate=generate)
        # A continuation or fork must run where its KV lives: the handle names the worker.
        holder = (task.continue_from or task.fork_from).partition(":")[0]
        samples = [SampleSoFar() for _ in range(task.n)]
        with _tracer.start_as_current_span("router.generate", attributes={
                "trellis.branch": task.branch, "trellis.n": task.n, "trellis.task_id": request.task_id},
                record_exception=False, set_status_on_exception=False) as span, task_outcome("generate", span):
            result = await self._generate_traced(request, holder, samples, on_token)
            return result

    async def _generate_traced(self, request: worker_pb2.WorkerRequest, holder: str, samples: list[SampleSoFar],
                               on_token: TokenSink) -> GenerateOutput:
        task_n = len(samples)
        finished = False
        try:
            try:
                failed: set[str] = set()   # workers that failed this task: its migrations go elsewhere
                result = await self._stream(request, holder, samples, list(range(task_n)), on_token, failed)
            except StatusError as err:
                # A continuation's KV died with its worker: the controller decides (it may re-send). With no
                # worker to take the task at all, there is nowhere to migrate to.
                if holder or err.code != grpc.StatusCode.UNAVAILABLE or isinstance(err, NoWorker):
                    raise
                result = await migrate(
                    request, samples, err, lambda resumed, i: self._stream(resumed, "", samples, [i], on_token, failed),
                    self._timeout_ms, self.max_migrations, self._count_migration)
            finished = True
            return self._output(result)
        except StatusError as err:
            raise TaskFailed(TaskFailure(err.code.name, err.message, err.field, err.reason)) from err
        finally:
            if not finished:
                # Stopped early by its controller (stop_when), cancelled or failed: what it streamed was spent.
                self.usage.completion_tokens += sum(len(s.token_ids) for s in samples)

    async def _stream(self, request: worker_pb2.WorkerRequest, holder: str, samples: list[SampleSoFar],
                      indexes: list[int], on_token: TokenSink, failed: set[str]) -> common_pb2.GenerateResult:
        """Run one worker task; its sample j is the caller's sample indexes[j]. A worker that fails it with
        UNAVAILABLE joins `failed`."""
        keeps = request.generate.keep.keep
        used: list[WorkerConnection] = []

        def picked(worker: WorkerConnection) -> None:
            used.append(worker)
            self.home = worker.address
            if keeps:
                self._kept_on(worker)

        try:
            async for response in dispatch(self.pool, request, self.model, common_pb2.CAPABILITY_GENERATE,
                                           self._wait_s(), worker_id=holder, picked=picked, avoid=failed,
                                           home=self.home):
                kind = response.WhichOneof("kind")
                if kind == "delta":
                    if self.usage.first_token is None:
                        self.usage.first_token = time.monotonic()
                    d = response.delta
                    index = indexes[d.index]
                    samples[index].add(d)
                    on_token(TokenDelta(index, d.text, len(d.token_ids), [lp.logprob for lp in d.logprobs],
                                        [[t.logprob for t in lp.top] for lp in d.logprobs],
                                        finish_reason_name(d.finish_reason) if d.finish_reason else ""))
                elif kind == "generate_result":
                    result = response.generate_result
                    for c in result.completions:
                        sample = samples[indexes[c.index]]
                        sample.finish_reason, sample.stop_reason = c.finish_reason, c.stop_reason
                        sample.cumulative_logprob += c.cumulative_logprob
                    for j, handle in enumerate(result.sequence_handles):
                        samples[indexes[j]].handle = handle
                    return result
        except StatusError as err:
            if used and used[-1].info is not None and err.code == grpc.StatusCode.UNAVAILABLE:
                failed.add(used[-1].info.worker_id)
            raise
        raise StatusError(grpc.StatusCode.INTERNAL, "worker ended the task without a result")

    async def score(self, task: Score) -> ScoreOutput:
        kind = _SCORE_KINDS.get(task.kind)
        if kind is None:
            raise TaskFailed(TaskFailure("INVALID_ARGUMENT", f"score kind must be one of {', '.join(_SCORE_KINDS)}, "
                                                             f"got {task.kind!r}", "kind"))
        request = common_pb2.ScoreRequest(prompt=prompt_to_pb(task.prompt), candidates=task.candidates, kind=kind,
                                          step_separator=task.step_separator, model=task.model)
        with _tracer.start_as_current_span("router.score", attributes={
                "trellis.kind": task.kind, "trellis.candidates": len(task.candidates)},
                record_exception=False, set_status_on_exception=False) as span, task_outcome("score", span):
            return await self._score(request)

    async def _score(self, request: common_pb2.ScoreRequest) -> ScoreOutput:
        try:
            kind_name = check_score_request(request)
            wire = worker_pb2.WorkerRequest(task_id=f"{self.task_prefix}/{self._next_task()}",
                                            timeout_ms=self._timeout_ms(), run=self._run_context(),
                                            score=worker_pb2.ScoreTask(request=request))
            # The reward model's pool is named by the task, not by the run's generation model.
            async for response in dispatch(self.pool, wire, request.model, CAPABILITY_OF_KIND[kind_name],
                                           self._wait_s()):
                if response.WhichOneof("kind") == "score_result":
                    result = response.score_result
                    self.usage.tasks += 1
                    self.usage.prompt_tokens += result.usage.prompt_tokens
                    ordered = sorted(result.scores, key=lambda c: c.index)
                    return ScoreOutput(scores=[c.score for c in ordered],
                                       step_scores=[list(c.step_scores) for c in ordered], worker_id=result.worker_id)
        except StatusError as err:
            raise TaskFailed(TaskFailure(err.code.name, err.message, err.field, err.reason)) from err
        raise TaskFailed(TaskFailure(grpc.StatusCode.INTERNAL.name, "worker ended the task without a result"))

    def _run_context(self) -> worker_pb2.RunContext:
        """The run as a worker scheduler sees it: its identity, priority and the service it has attained."""
        return worker_pb2.RunContext(run_id=self.task_prefix, priority=self.priority,
                                     tokens=self.usage.prompt_tokens + self.usage.completion_tokens,
                                     tasks_done=self.usage.tasks)

    def _count_migration(self) -> None:
        self.usage.migrations += 1

    def _kept_on(self, worker: WorkerConnection) -> None:
        self.kept_on[worker.address] = worker

    def release_kept(self) -> None:
        """The run is over: each worker that ran one of its tasks asked to keep sequences drops them now,
        rather than when their TTL runs out. By task-id prefix, so a task cancelled before its result (which
        never named its handles) is covered too."""
        if not self.kept_on:
            return
        release = worker_pb2.WorkerRequest(release=worker_pb2.ReleaseSequences(task_prefix=self.task_prefix))
        for worker in self.kept_on.values():
            worker.post(release)

    def _wait_s(self) -> float:
        if self.deadline is None:
            return self.worker_wait_s
        return min(self.worker_wait_s, max(0.0, self.deadline - time.monotonic()))

    def _output(self, result: common_pb2.GenerateResult) -> GenerateOutput:
        self.usage.tasks += 1
        self.usage.prompt_tokens += result.usage.prompt_tokens
        self.usage.completion_tokens += result.usage.completion_tokens
        samples = [
            SampleOut(index=c.index, text=c.text, finish_reason=finish_reason_name(c.finish_reason),
                      token_count=len(c.token_ids), cumulative_logprob=c.cumulative_logprob,
                      token_logprobs=[lp.logprob for lp in c.logprobs],
                      top_logprobs=[[t.logprob for t in lp.top] for lp in c.logprobs], stop_reason=c.stop_reason)
            for c in result.completions
        ]
        return GenerateOutput(samples=samples, prompt_tokens=result.usage.prompt_tokens,
                              completion_tokens=result.usage.completion_tokens, worker_id=result.worker_id,
                              handles=list(result.sequence_handles),
                              cached_prompt_tokens=result.usage.cached_prompt_tokens)
