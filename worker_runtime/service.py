"""The Worker gRPC service, engine-agnostic: worker_cpu and worker_gpu both serve it.

One Connect stream per router multiplexes many tasks. Each generate task runs as its own asyncio
task pumping engine events onto the stream; a cancel message, a deadline or the stream's end
cancels it in the engine so its KV is freed. Score tasks go to the Scorer (a reward model, or a
verifier on the generation model); a worker may have an engine, a scorer or both.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator

import grpc
import structlog

from trellis_rpc.errors import StatusError, code_number
from trellis_rpc.finish_reasons import finish_reason_pb
from trellis_rpc.sampling import check_prompt, resolve_sampling
from trellis_rpc.scoring import CAPABILITY_OF_KIND, DEFAULT_STEP_SEPARATOR, check_score_request
from trellis_rpc.streams import coalesce, drained
from trellis_rpc.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from worker_runtime.engine_api import (
    Delta,
    Engine,
    Finished,
    LoadStats,
    PromptInput,
    RunInfo,
    ScoreInput,
    ScoreOut,
    Scorer,
    SequenceSource,
    TokenLogprob,
)
from worker_runtime.telemetry import WorkerTelemetry

log = structlog.get_logger(__name__)

_END = object()
DEFAULT_KEEP_TTL_S = 60.0
MAX_KEEP_TTL_S = 3600.0


def prompt_input(prompt: common_pb2.Prompt) -> PromptInput:
    kind = prompt.WhichOneof("kind")
    if kind == "text":
        return PromptInput(text=prompt.text)
    if kind == "chat":
        return PromptInput(chat=[{"role": m.role, "content": m.content} for m in prompt.chat.messages],
                           continue_final_message=prompt.chat.continue_final_message)
    return PromptInput(token_ids=list(prompt.token_ids.ids))


def logprobs_pb(items: list[TokenLogprob]) -> list[common_pb2.TokenLogprob]:
    return [
        common_pb2.TokenLogprob(
            token_id=lp.token_id, logprob=lp.logprob,
            top=[common_pb2.TopLogprob(token_id=t.token_id, logprob=t.logprob, token=t.token) for t in lp.top],
        )
        for lp in items
    ]


def result_pb(done: Finished, model_id: str, worker_id: str) -> common_pb2.GenerateResult:
    """Handles go out as '<worker_id>:<engine handle>' so the router can route a continuation back."""
    completions = [
        common_pb2.Completion(
            index=c.index, text=c.text, token_ids=c.token_ids, finish_reason=finish_reason_pb(c.finish_reason),
            stop_reason=c.stop_reason, logprobs=logprobs_pb(c.logprobs), cumulative_logprob=c.cumulative_logprob,
        )
        for c in done.completions
    ]
    return common_pb2.GenerateResult(
        completions=completions,
        usage=common_pb2.Usage(
            prompt_tokens=done.prompt_tokens,
            completion_tokens=sum(len(c.token_ids) for c in done.completions),
            cached_prompt_tokens=done.cached_prompt_tokens, tasks=1,
        ),
        timings=common_pb2.Timings(queue_ms=done.queue_ms, ttft_ms=done.ttft_ms, latency_ms=done.latency_ms),
        model_id=model_id, worker_id=worker_id,
        sequence_handles=[f"{worker_id}:{h}" if h else "" for h in done.handles],
    )


def score_result_pb(done: ScoreOut, model_id: str, worker_id: str) -> common_pb2.ScoreResult:
    return common_pb2.ScoreResult(
        scores=[common_pb2.CandidateScore(index=c.index, score=c.score, step_scores=c.step_scores)
                for c in done.scores],
        usage=common_pb2.Usage(prompt_tokens=done.prompt_tokens, tasks=1),
        timings=common_pb2.Timings(queue_ms=done.queue_ms, latency_ms=done.latency_ms),
        model_id=model_id, worker_id=worker_id,
    )


def coalesce_deltas(responses: list[worker_pb2.WorkerResponse]) -> list[worker_pb2.WorkerResponse]:
    """Responses that queued up while the stream was busy, with each sample's token deltas merged into one
    message (in order; anything else is a barrier, so a task's result still follows its deltas)."""
    return coalesce(responses, _sample_key, _merge_delta)


def _sample_key(response: worker_pb2.WorkerResponse) -> tuple[str, int] | None:
    return (response.task_id, response.delta.index) if response.WhichOneof("kind") == "delta" else None


def _merge_delta(into: worker_pb2.WorkerResponse, new: worker_pb2.WorkerResponse) -> None:
    d, more = into.delta, new.delta
    d.text += more.text
    d.token_ids.extend(more.token_ids)
    d.logprobs.extend(more.logprobs)
    if more.finish_reason:
        d.finish_reason = more.finish_reason


_TASK_ENDS = ("generate_result", "score_result", "error")


def error_response(task_id: str, err: StatusError) -> worker_pb2.WorkerResponse:
    error = worker_pb2.TaskError(code=code_number(err.code), message=err.message, field=err.field, reason=err.reason)
    return worker_pb2.WorkerResponse(task_id=task_id, error=error)


def _send_error(out: asyncio.Queue, task_id: str, err: StatusError) -> StatusError:
    out.put_nowait(error_response(task_id, err))
    return err


def run_info(req: worker_pb2.WorkerRequest) -> RunInfo | None:
    """The task's run (RunContext on the wire), for engines and scorers that schedule by run."""
    if not req.HasField("run"):
        return None
    return RunInfo(req.run.run_id, req.run.priority, req.run.tokens, req.run.tasks_done)

class WorkerService(worker_pb2_grpc.WorkerServicer):
    """Serves an engine and/or a scorer once `attach` is called; UNAVAILABLE before that (model loading)."""

    def __init__(self, worker_id: str | None = None, version: str = "", max_n: int = 64,
                 load_interval_s: float = 0.25, heartbeat_s: float = 1.0) -> None:
        self.worker_id = worker_id or f"worker-{uuid.uuid4().hex[:8]}"
        self.version = version
        self.max_n = max_n
        self.load_interval_s = load_interval_s
        self.heartbeat_s = heartbeat_s
        self.engine: Engine | None = None
        self.scorer: Scorer | None = None
        self._attached = False
        self.telemetry = WorkerTelemetry(self.worker_id, self._load)

    def attach(self, engine: Engine | None, scorer: Scorer | None = None) -> None:
        """engine: generation (None on a reward-model worker); scorer: score tasks (None: score tasks are refused)."""
        if engine is None and scorer is None:
            raise ValueError("a worker needs an engine, a scorer or both")
        self.engine = engine
        self.scorer = scorer
        if engine is not None:
            self.telemetry.attributes["scheduling"] = engine.info.scheduling   # metrics compare policies
        self._attached = True

    def _check_attached(self) -> None:
        if not self._attached:
            raise StatusError(grpc.StatusCode.UNAVAILABLE, "model is still loading")

    def capabilities(self) -> list[int]:
        self._check_attached()
        caps = []
        if self.engine is not None:
            caps.append(common_pb2.CAPABILITY_GENERATE)
        if self.scorer is not None:
            caps += [CAPABILITY_OF_KIND[k] for k in self.scorer.info.kinds]
        if self.engine is not None and self.engine.info.keeps_sequences:
            caps += [common_pb2.CAPABILITY_KEEP_SEQUENCES, common_pb2.CAPABILITY_PREFIX_CACHE]
        return caps

    @property
    def model_id(self) -> str:
        return self.engine.info.model_id if self.engine is not None else self.scorer.info.model_id

    def info_pb(self) -> worker_pb2.WorkerInfo:
        caps = self.capabilities()
        if self.engine is not None:
            info = self.engine.info
            return worker_pb2.WorkerInfo(
                worker_id=self.worker_id, model_id=info.model_id, capabilities=caps, engine=info.engine,
                max_context_tokens=info.max_context_tokens, max_batch_size=info.max_batch_size,
                kv_block_size=info.kv_block_size, kv_blocks_total=info.kv_blocks_total,
                version=self.version, eos_token=info.eos_token,
            )
        info = self.scorer.info
        return worker_pb2.WorkerInfo(
            worker_id=self.worker_id, model_id=info.model_id, capabilities=caps, engine=info.engine,
            max_context_tokens=info.max_context_tokens, max_batch_size=info.max_candidates,
            version=self.version, eos_token=info.eos_token,
        )

    async def Info(self, request: worker_pb2.InfoRequest, context: grpc.aio.ServicerContext) -> worker_pb2.WorkerInfo:
        try:
            return self.info_pb()
        except StatusError as err:
            await context.abort(err.code, err.message)

    def _load(self) -> LoadStats:
        """The engine's load plus the scorer's queue and batch."""
        stats = self.engine.load() if self.engine is not None else LoadStats(0, 0, 0, 0)
        if self.scorer is not None:
            scoring = self.scorer.load()
            stats = dataclasses.replace(stats, queue_depth=stats.queue_depth + scoring.queue_depth,
                                        running_sequences=stats.running_sequences + scoring.running_sequences)
        return stats

    def _load_pb(self, stats: LoadStats) -> worker_pb2.WorkerResponse:
        return worker_pb2.WorkerResponse(load=worker_pb2.LoadReport(
            queue_depth=stats.queue_depth, running_sequences=stats.running_sequences,
            kv_blocks_used=stats.kv_blocks_used, kv_blocks_free=stats.kv_blocks_free,
            kept_sequences=stats.kept_sequences, model_id=self.model_id,
            capabilities=self.capabilities(), timestamp_unix=time.time(),
        ))

    async def Connect(self, request_iterator: AsyncIterator[worker_pb2.WorkerRequest],
                      context: grpc.aio.ServicerContext) -> AsyncIterator[worker_pb2.WorkerResponse]:
        try:
            self._check_attached()
        except StatusError as err:
            await context.abort(err.code, err.message)
        engine = self.engine
        out: asyncio.Queue = asyncio.Queue()
        running: dict[str, asyncio.Task] = {}
        reader = asyncio.create_task(self._read(request_iterator, engine, out, running))
        reporter = asyncio.create_task(self._report_load(out))
        try:
            async for batch, ended in drained(out, _END):
                finished = False
                for item in coalesce_deltas(batch):
                    finished = finished or item.WhichOneof("kind") in _TASK_ENDS
                    yield item
                if finished and not ended:
                    # The load right after tasks ended (their KV freed): the periodic report may be up to
                    # load_interval_s old, and a router weighing a stale one steers the next task sharing
                    # the prefix away from the worker that just cached it.
                    yield self._load_pb(self._load())
        finally:
            reader.cancel()
            reporter.cancel()
            # The router went away: nobody will read these results, so free their KV now.
            for task_id, task in list(running.items()):
                if engine is not None:
                    engine.cancel(task_id)
                task.cancel()

    async def _read(self, requests: AsyncIterator[worker_pb2.WorkerRequest], engine: Engine | None,
                    out: asyncio.Queue, running: dict[str, asyncio.Task]) -> None:
        scoring: set[str] = set()  # task ids in `running` that are score tasks
        try:
            async for req in requests:
                kind = req.WhichOneof("kind")
                if kind in ("generate", "score"):
                    if req.task_id in running:
                        self._refuse(out, kind, req.task_id, StatusError(
                            grpc.StatusCode.ALREADY_EXISTS, f"task_id: {req.task_id} is already running", "task_id"))
                        continue
                    if kind == "generate" and engine is None:
                        self._refuse(out, kind, req.task_id, StatusError(
                            grpc.StatusCode.FAILED_PRECONDITION,
                            "this worker serves a reward model and cannot generate", "generate"))
                        continue
                    if kind == "generate":
                        task = asyncio.create_task(self._observed(kind, req, self._generate(engine, req, out)))
                    else:
                        task = asyncio.create_task(self._observed(kind, req, self._score(req, out)))
                        scoring.add(req.task_id)
                    running[req.task_id] = task

                    def done(_t, tid=req.task_id):
                        running.pop(tid, None)
                        scoring.discard(tid)

                    task.add_done_callback(done)
                elif kind == "cancel":
                    target = req.cancel.target_task_id
                    if target in scoring:
                        running[target].cancel()
                    elif engine is not None:
                        engine.cancel(target)
                elif kind == "release":
                    release = getattr(engine, "release", None)   # an engine that keeps nothing frees nothing
                    if release is not None and req.release.task_prefix:
                        release(req.release.task_prefix)
                else:
                    out.put_nowait(error_response(req.task_id, StatusError(
                        grpc.StatusCode.INVALID_ARGUMENT, "kind: one of generate, score, cancel, release must be set",
                        "kind")))
        except (asyncio.CancelledError, grpc.aio.AioRpcError):
            pass
        finally:
            # Let in-flight tasks finish and deliver their results (graceful drain), then end the stream.
            if running:
                await asyncio.gather(*running.values(), return_exceptions=True)
            out.put_nowait(_END)

    def _refuse(self, out: asyncio.Queue, kind: str, task_id: str, err: StatusError) -> None:
        self.telemetry.ended(kind, err.code.name, err.message)
        out.put_nowait(error_response(task_id, err))

    async def _observed(self, kind: str, req: worker_pb2.WorkerRequest, work) -> None:
        """Run a task's coroutine (which returns its error, or None) in its span, and count how it ended."""
        with self.telemetry.task_span(f"worker.{kind}", req.task_id, dict(req.trace_context),
                                      req.run if req.HasField("run") else None):
            try:
                err = await work
            except asyncio.CancelledError:
                self.telemetry.ended(kind, "CANCELLED", "cancelled by the router")
                raise
            if err is None:
                self.telemetry.ended(kind, "OK")
            else:
                self.telemetry.ended(kind, err.code.name, err.message)
                log.debug("task failed", task_id=req.task_id, code=err.code.name, message=err.message)

    async def _generate(self, engine: Engine, req: worker_pb2.WorkerRequest,
                        out: asyncio.Queue) -> StatusError | None:
        task_id = req.task_id
        gen = req.generate
        try:
            source = self._source(gen)
            if source is None or gen.prompt.WhichOneof("kind") == "chat":
                check_prompt(gen.prompt, "prompt")
            sampling = resolve_sampling(gen.sampling, max_n=self.max_n)
            keep_ttl_s = None
            if gen.keep.keep:
                if gen.keep.ttl_ms < 0:
                    raise StatusError(grpc.StatusCode.INVALID_ARGUMENT, "keep.ttl_ms: must be >= 0", "keep.ttl_ms")
                keep_ttl_s = min(gen.keep.ttl_ms / 1000 if gen.keep.ttl_ms else DEFAULT_KEEP_TTL_S, MAX_KEEP_TTL_S)
            timeout = req.timeout_ms / 1000.0 if req.timeout_ms > 0 else None
            prompt = prompt_input(gen.prompt) if gen.prompt.WhichOneof("kind") else PromptInput(text="")
            async with asyncio.timeout(timeout):
                async for event in engine.generate(task_id, prompt, sampling, source, keep_ttl_s, run_info(req)):
                    if isinstance(event, Delta):
                        if gen.stream:
                            out.put_nowait(worker_pb2.WorkerResponse(task_id=task_id, delta=worker_pb2.TokenDelta(
                                index=event.index, text=event.text, token_ids=event.token_ids,
                                logprobs=logprobs_pb(event.logprobs),
                                finish_reason=finish_reason_pb(event.finish_reason))))
                    elif isinstance(event, Finished):
                        self.telemetry.generated(event)
                        out.put_nowait(worker_pb2.WorkerResponse(
                            task_id=task_id, generate_result=result_pb(event, engine.info.model_id, self.worker_id)))
                        if any(c.finish_reason == "cancelled" for c in event.completions):
                            # The router cancelled it and got the partial result; for the books it ended CANCELLED.
                            return StatusError(grpc.StatusCode.CANCELLED, "cancelled by the router")
            return None
        except StatusError as err:
            return _send_error(out, task_id, err)
        except TimeoutError:
            engine.cancel(task_id)
            return _send_error(out, task_id, StatusError(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"task {task_id} ran past its {req.timeout_ms} ms deadline"))
        except asyncio.CancelledError:
            engine.cancel(task_id)
            raise
        except Exception as exc:  # an engine bug must fail this task, not the stream
            log.exception("generate failed", task_id=task_id)
            engine.cancel(task_id)
            return _send_error(out, task_id, StatusError(grpc.StatusCode.INTERNAL, f"engine error: {exc!r}"))

    def _score_input(self, request: common_pb2.ScoreRequest) -> ScoreInput:
        """Checks that need this worker: a scorer of the requested kind, the requested model."""
        scorer = self.scorer
        kind = check_score_request(request, scorer.info.max_candidates if scorer is not None else None)
        if scorer is None:
            raise StatusError(grpc.StatusCode.FAILED_PRECONDITION,
                              f"kind: this worker ({self.model_id}) has no reward model or verifier", "kind")
        if kind not in scorer.info.kinds:
            raise StatusError(grpc.StatusCode.FAILED_PRECONDITION,
                              f"kind: this worker's model {scorer.info.model_id} scores "
                              f"{' and '.join(scorer.info.kinds)}, not {kind}", "kind")
        if request.model and request.model != scorer.info.model_id:
            raise StatusError(grpc.StatusCode.FAILED_PRECONDITION,
                              f"model: this worker serves {scorer.info.model_id}, not {request.model}", "model")
        return ScoreInput(prompt=prompt_input(request.prompt), candidates=list(request.candidates), kind=kind,
                          step_separator=request.step_separator or DEFAULT_STEP_SEPARATOR)

    async def _score(self, req: worker_pb2.WorkerRequest, out: asyncio.Queue) -> StatusError | None:
        task_id = req.task_id
        try:
            request = self._score_input(req.score.request)
            request.run = run_info(req)
            timeout = req.timeout_ms / 1000.0 if req.timeout_ms > 0 else None
            async with asyncio.timeout(timeout):
                done = await self.scorer.score(task_id, request)
            self.telemetry.scored(done)
            out.put_nowait(worker_pb2.WorkerResponse(
                task_id=task_id, score_result=score_result_pb(done, self.scorer.info.model_id, self.worker_id)))
            return None
        except StatusError as err:
            return _send_error(out, task_id, err)
        except TimeoutError:
            return _send_error(out, task_id, StatusError(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"task {task_id} ran past its {req.timeout_ms} ms deadline"))
        except asyncio.CancelledError:
            out.put_nowait(error_response(task_id, StatusError(grpc.StatusCode.CANCELLED, f"task {task_id} cancelled")))
            raise
        except Exception as exc:  # a scorer bug must fail this task, not the stream
            log.exception("score failed", task_id=task_id)
            return _send_error(out, task_id, StatusError(grpc.StatusCode.INTERNAL, f"scorer error: {exc!r}"))

    def _source(self, gen: worker_pb2.GenerateTask) -> SequenceSource | None:
        which = gen.WhichOneof("source")
        if which is None:
            return None
        handle = getattr(gen, which).handle
        owner, _, local = handle.partition(":")
        if owner != self.worker_id or not local:
            raise StatusError(grpc.StatusCode.NOT_FOUND, f"{which}.handle: {handle!r} was not kept by this worker "
                              f"({self.worker_id})", f"{which}.handle")
        return SequenceSource(local, fork=which == "fork_from")

    async def _report_load(self, out: asyncio.Queue) -> None:
        """A report whenever the load changes (checked every load_interval_s), and at least once per
        heartbeat_s so the router can tell a live idle worker from a silent one."""
        last, sent_at = None, 0.0
        while True:
            stats = self._load()
            now = time.monotonic()
            if stats != last or now - sent_at >= self.heartbeat_s:
                out.put_nowait(self._load_pb(stats))
                last, sent_at = stats, now
            await asyncio.sleep(self.load_interval_s)
