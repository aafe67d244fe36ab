"""Moving a generate task off a worker that failed mid-stream (Dynamo calls it request migration).

gRPC's retry policy cannot retry a stream that has already answered, so the router does it: it
remembers what each sample streamed, and when the worker's link breaks, sends every sample that had
not finished to another worker as its prompt plus the text so far, for the tokens it still had to
generate. Finished samples stay as they were. The client sees one uninterrupted stream per sample.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc
import structlog
from opentelemetry import trace

from router import metrics
from router.convert import prompt_from_pb, prompt_to_pb
from router.pool import NoWorker
from trellis_rpc.errors import StatusError
from trellis_rpc.sampling import DEFAULT_MAX_TOKENS, derive_seed
from trellis_rpc.v1 import common_pb2, worker_pb2

log = structlog.get_logger(__name__)

# What a worker answers when it refuses a task as asked (its prompt too long for the context or the KV cache).
_REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.RESOURCE_EXHAUSTED}

# Runs one resumed sample on some worker: (its task, the sample's index) -> the task's result.
StreamOne = Callable[[worker_pb2.WorkerRequest, int], Awaitable[common_pb2.GenerateResult]]


class Unresumable(StatusError):
    """A sample cut off by a failed worker that another worker refused to resume: moving it again cannot help."""


@dataclass
class SampleSoFar:
    """What one sample of a task has streamed, across every worker it ran on."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[common_pb2.TokenLogprob] = field(default_factory=list)
    finish_reason: int = common_pb2.FINISH_REASON_UNSPECIFIED   # set by its last delta or its result
    stop_reason: str = ""
    cumulative_logprob: float = 0.0
    handle: str = ""

    def add(self, delta: worker_pb2.TokenDelta) -> None:
        self.text += delta.text
        self.token_ids.extend(delta.token_ids)
        self.logprobs.extend(delta.logprobs)
        if delta.finish_reason:
            self.finish_reason = delta.finish_reason

    @property
    def finished(self) -> bool:
        return self.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED


def continuation(task: worker_pb2.GenerateTask, sample: SampleSoFar, max_tokens: int,
                 attempt: int) -> worker_pb2.GenerateTask:
    """One sample of `task`, resumed: n=1, the tokens it has left, a seed of its own."""
    resumed = worker_pb2.GenerateTask()
    resumed.CopyFrom(task)
    # The same continuation rule as a controller's (controllers.Prompt.continued): the sample's output so
    # far is the start of the answer the other worker goes on with.
    resumed.prompt.CopyFrom(prompt_to_pb(prompt_from_pb(task.prompt).continued(sample.text, sample.token_ids)))
    resumed.sampling.n = 1
    resumed.sampling.max_tokens = max(1, max_tokens - len(sample.token_ids))
    if resumed.sampling.HasField("min_tokens"):
        resumed.sampling.min_tokens = max(0, resumed.sampling.min_tokens - len(sample.token_ids))
    if resumed.sampling.HasField("seed"):
        resumed.sampling.seed = derive_seed(resumed.sampling.seed, attempt, len(sample.token_ids))
    return resumed


def merged_result(samples: list[SampleSoFar], prompt_tokens: int, cached: int, model_id: str,
                  worker_ids: list[str]) -> common_pb2.GenerateResult:
    completions = [
        common_pb2.Completion(index=i, text=s.text, token_ids=s.token_ids, finish_reason=s.finish_reason,
                              stop_reason=s.stop_reason, logprobs=s.logprobs, cumulative_logprob=s.cumulative_logprob)
        for i, s in enumerate(samples)
    ]
    usage = common_pb2.Usage(prompt_tokens=prompt_tokens, cached_prompt_tokens=cached,
                             completion_tokens=sum(len(s.token_ids) for s in samples), tasks=1)
    return common_pb2.GenerateResult(completions=completions, usage=usage, model_id=model_id,
                                     worker_id=",".join(dict.fromkeys(w for w in worker_ids if w)),
                                     sequence_handles=[s.handle for s in samples] if any(s.handle for s in samples)
                                     else [])


async def migrate(request: worker_pb2.WorkerRequest, samples: list[SampleSoFar], failure: StatusError,
                  stream: StreamOne, timeout_ms: Callable[[], int], max_migrations: int,
                  on_attempt: Callable[[], None]) -> common_pb2.GenerateResult:
    """Resume the unfinished samples of `request` elsewhere, each from its text so far, up to max_migrations
    tries; the merged result of all of them, or the failure that ended the tries."""
    task = request.generate
    max_tokens = task.sampling.max_tokens if task.sampling.HasField("max_tokens") else DEFAULT_MAX_TOKENS
    results: list[common_pb2.GenerateResult] = []
    for attempt in range(1, max_migrations + 1):
        unfinished = [i for i, s in enumerate(samples) if not s.finished]
        log.warning("migrating task", task_id=request.task_id, attempt=attempt, samples=len(unfinished),
                    reason=failure.message)
        trace.get_current_span().add_event("migrating", {"attempt": attempt, "samples": len(unfinished),
                                                         "reason": failure.message})
        on_attempt()
        metrics.migrations.add(len(unfinished))

        async def resume(i: int, attempt: int = attempt, why: str = failure.message) -> common_pb2.GenerateResult:
            resumed = worker_pb2.WorkerRequest(task_id=f"{request.task_id}/m{attempt}.{i}", timeout_ms=timeout_ms(),
                                               run=request.run,
                                               generate=continuation(task, samples[i], max_tokens, attempt))
            try:
                return await stream(resumed, i)
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
                      f"{failure.message} (gave up after {max_migrations} migrations to other workers)")
