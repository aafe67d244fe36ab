"""The router's TaskRunner: sends a controller's generate tasks to workers and streams their tokens back."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator

import grpc
import structlog
from opentelemetry import trace

from controllers import Generate, GenerateOutput, SampleOut, TaskFailure
from controllers.runtime import EarlyStop, TaskFailed, TokenSink
from controllers.tasks import Cancel, Score, ScoreOutput, TokenDelta, WaitAny
from router import metrics
from router.convert import FINISH_NAMES, prompt_to_pb, sampling_with_overrides
from router.migration import SampleSoFar, continuation, merged_result
from router.pool import NoWorker, WorkerPool
from router.worker_connection import WorkerConnection
from trellis_rpc.errors import StatusError, code_from_number
from trellis_rpc.sampling import DEFAULT_MAX_TOKENS
from trellis_rpc.scoring import CAPABILITY_OF_KIND, check_score_request
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
                   ) -> AsyncIterator[worker_pb2.WorkerResponse]:
    """Send one task to a worker of the pool (to worker_id, if given; `picked` hears which); yield its
    responses; a worker error raises StatusError."""
    worker = await pool.pick(model, capability, wait_s=wait_s, worker_id=worker_id, prompt_key=prompt_key(request))
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


class Unresumable(StatusError):
    """A sample cut off by a failed worker that another worker refused to resume: moving it again cannot help."""


# What a worker answers when it refuses a task as asked (its prompt too long for the context or the KV cache).
_REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.RESOURCE_EXHAUSTED}

_SCORE_KINDS = {"outcome": common_pb2.SCORE_KIND_OUTCOME, "process": common_pb2.SCORE_KIND_PROCESS,
                "verifier": common_pb2.SCORE_KIND_VERIFIER}


log = structlog.get_logger(__name__)
_tracer = tracer(__name__)


@contextlib.contextmanager
def task_outcome(kind: str, span: trace.Span) -> Iterator[None]:
    """Count the task by how it ended (gRPC status code name) and mark its span when it failed."""
    code = "OK"
    try:
        yield
    except EarlyStop:
        code = "CANCELLED"
        span.set_attribute("trellis.stopped_early", True)  # the controller's stop_when fired: not an error
        raise
    except TaskFailed as exc:
        code = exc.failure.code
        span.set_status(trace.Status(trace.StatusCode.ERROR, f"{code}: {exc.failure.message}"))
        raise
    except StatusError as err:  # a task sent straight to a worker (Router.Generate / Router.Score)
        code = err.code.name
        span.set_status(trace.Status(trace.StatusCode.ERROR, f"{code}: {err.message}"))
        raise
    except asyncio.CancelledError:
        code = "CANCELLED"
        span.set_attribute("trellis.cancelled", True)
        raise
    except Exception as exc:
        code = "INTERNAL"
        span.set_status(trace.Status(trace.StatusCode.ERROR, f"INTERNAL: {exc!r}"))
        raise
    finally:
        metrics.tasks.add(1, kind, code)


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
    def __init__(self, pool: WorkerPool, run_id: str, model: str, sampling: common_pb2.SamplingParams,
                 deadline: float | None, worker_wait_s: float, max_migrations: int = 2, max_tasks: int = 0,
                 max_tokens: int = 0, max_n: int = 0) -> None:
        """max_tasks: tasks this run may start (bounds a search tree); max_tokens: per generate task; max_n:
        samples per generate task. 0: no limit."""
        self.pool = pool
        self.run_id = run_id
        self.model = model
        self.sampling = sampling
        self.deadline = deadline  # time.monotonic() value, or None
        self.worker_wait_s = worker_wait_s
        self.max_migrations = max_migrations
        self.usage = RunUsage()
        self._ids = itertools.count()
        # Task ids must be unique on a worker; run_id is the client's and two runs may share one.
        self.task_prefix = f"{run_id}.{uuid.uuid4().hex[:8]}"
        self.max_tasks = max_tasks
        self.max_tokens = max_tokens
        self.max_n = max_n
        # Workers that ran a task asked to keep its sequences: told to release them when the run ends.
        self.kept_on: dict[str, WorkerConnection] = {}

    def _next_task(self) -> int:
        number = next(self._ids)
        if self.max_tasks and number >= self.max_tasks:
            raise TaskFailed(TaskFailure("RESOURCE_EXHAUSTED", f"this run has started its limit of {self.max_tasks} "
                                                               f"tasks (the router's --max-tasks-per-run)"))
        return number

    def _timeout_ms(self) -> int:
        if self.deadline is None:
            return 0
        return max(1, int((self.deadline - time.monotonic()) * 1000))

    async def generate(self, task: Generate, on_token: TokenSink) -> GenerateOutput:
        # Checked before anything is allocated per sample: n comes from controller code, which may not have
        # marked the parameter it derives n from as limited by the router's n cap.
        if not 1 <= task.n <= (self.max_n or task.n):
            raise TaskFailed(TaskFailure("RESOURCE_EXHAUSTED", f"a task asked for n={task.n} samples; this run's "
                                                               f"limit is 1 to {self.max_n or 'any'}"))
        number = self._next_task()
        sampling = sampling_with_overrides(self.sampling, task.sampling, task.n)
        asked = sampling.max_tokens if sampling.HasField("max_tokens") else DEFAULT_MAX_TOKENS
        if self.max_tokens and asked > self.max_tokens:
            raise TaskFailed(TaskFailure("PERMISSION_DENIED", f"sampling.max_tokens: {asked} is over this run's limit "
                                                              f"of {self.max_tokens}", "sampling.max_tokens"))
        if sampling.HasField("seed") and "seed" not in task.sampling and number:
            # A seeded run stays reproducible, but its tasks must not all draw the same samples: the
            # worker seeds sample i of a task from (seed, i), so n separate n=1 tasks would be copies.
            sampling.seed = (sampling.seed * 1_000_003 + number * 7_919) % 2**63
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
                                           generate=generate)
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
        try:
            try:
                result = await self._stream(request, holder, samples, list(range(task_n)), on_token)
            except StatusError as err:
                # A continuation's KV died with its worker: the controller decides (it may re-send). With no
                # worker to take the task at all, there is nowhere to migrate to.
                if holder or err.code != grpc.StatusCode.UNAVAILABLE or isinstance(err, NoWorker):
                    raise
                result = await self._migrate(request, samples, on_token, err)
            return self._output(result)
        except StatusError as err:
            raise TaskFailed(TaskFailure(err.code.name, err.message, err.field, err.reason)) from err

    async def _stream(self, request: worker_pb2.WorkerRequest, holder: str, samples: list[SampleSoFar],
                      indexes: list[int], on_token: TokenSink) -> common_pb2.GenerateResult:
        """Run one worker task; its sample j is the caller's sample indexes[j]."""
        keeps = request.generate.keep.keep
        async for response in dispatch(self.pool, request, self.model, common_pb2.CAPABILITY_GENERATE,
                                       self._wait_s(), worker_id=holder, picked=self._kept_on if keeps else None):
            kind = response.WhichOneof("kind")
            if kind == "delta":
                if self.usage.first_token is None:
                    self.usage.first_token = time.monotonic()
                d = response.delta
                index = indexes[d.index]
                samples[index].add(d)
                on_token(TokenDelta(index, d.text, len(d.token_ids), [lp.logprob for lp in d.logprobs],
                                    [[t.logprob for t in lp.top] for lp in d.logprobs]))
            elif kind == "generate_result":
                result = response.generate_result
                for c in result.completions:
                    sample = samples[indexes[c.index]]
                    sample.finish_reason, sample.stop_reason = c.finish_reason, c.stop_reason
                    sample.cumulative_logprob += c.cumulative_logprob
                for j, handle in enumerate(result.sequence_handles):
                    samples[indexes[j]].handle = handle
                return result
        raise StatusError(grpc.StatusCode.INTERNAL, "worker ended the task without a result")

    async def _migrate(self, request: worker_pb2.WorkerRequest, samples: list[SampleSoFar], on_token: TokenSink,
                       failure: StatusError) -> common_pb2.GenerateResult:
        """Resume the unfinished samples elsewhere, each from its text so far; up to max_migrations tries."""
        task = request.generate
        max_tokens = task.sampling.max_tokens if task.sampling.HasField("max_tokens") else DEFAULT_MAX_TOKENS
        results: list[common_pb2.GenerateResult] = []
        for attempt in range(1, self.max_migrations + 1):
            unfinished = [i for i, s in enumerate(samples) if not s.finished]
            log.warning("migrating task", task_id=request.task_id, attempt=attempt, samples=len(unfinished),
                        reason=failure.message)
            trace.get_current_span().add_event("migrating", {"attempt": attempt, "samples": len(unfinished),
                                                             "reason": failure.message})
            self.usage.migrations += 1
            metrics.migrations.add(len(unfinished))

            async def resume(i: int, attempt: int = attempt, why: str = failure.message) -> common_pb2.GenerateResult:
                resumed = worker_pb2.WorkerRequest(
                    task_id=f"{request.task_id}/m{attempt}.{i}", timeout_ms=self._timeout_ms(),
                    generate=continuation(task, samples[i], max_tokens, attempt))
                try:
                    return await self._stream(resumed, "", samples, [i], on_token)
                except StatusError as err:
                    if err.code not in _REFUSALS or not (samples[i].text or samples[i].token_ids):
                        raise
                    # The client's request was valid; what the worker refused is its resumed form, the prompt
                    # plus the text so far, which re-tokenizes differently (a random model's invalid UTF-8
                    # comes back as U+FFFD, 3 bytes) and may no longer fit the context. The run fails because
                    # a worker did: UNAVAILABLE (retry), not INVALID_ARGUMENT (change your request).
                    raise Unresumable(grpc.StatusCode.UNAVAILABLE,
                                      f"{why}; sample {i} could not resume on another worker: {err.message}") from err

            outcomes = await asyncio.gather(*(resume(i) for i in unfinished), return_exceptions=True)
            results += [o for o in outcomes if isinstance(o, common_pb2.GenerateResult)]
            errors = [o for o in outcomes if isinstance(o, BaseException)]
            if not errors:
                first = results[0] if results else common_pb2.GenerateResult()
                return merged_result(samples, first.usage.prompt_tokens, first.usage.cached_prompt_tokens,
                                     first.model_id, [r.worker_id for r in results])
            failure = next((e for e in errors if isinstance(e, StatusError)), None)
            if (failure is None or failure.code != grpc.StatusCode.UNAVAILABLE
                    or isinstance(failure, (NoWorker, Unresumable))):
                raise failure or errors[0]
        raise StatusError(grpc.StatusCode.UNAVAILABLE,
                          f"{failure.message} (gave up after {self.max_migrations} migrations to other workers)")

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
                                            timeout_ms=self._timeout_ms(), score=worker_pb2.ScoreTask(request=request))
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
            SampleOut(index=c.index, text=c.text, finish_reason=FINISH_NAMES.get(c.finish_reason, "stop"),
                      token_count=len(c.token_ids), cumulative_logprob=c.cumulative_logprob,
                      token_logprobs=[lp.logprob for lp in c.logprobs],
                      top_logprobs=[[t.logprob for t in lp.top] for lp in c.logprobs], stop_reason=c.stop_reason)
            for c in result.completions
        ]
        return GenerateOutput(samples=samples, prompt_tokens=result.usage.prompt_tokens,
                              completion_tokens=result.usage.completion_tokens, worker_id=result.worker_id,
                              handles=list(result.sequence_handles),
                              cached_prompt_tokens=result.usage.cached_prompt_tokens)
