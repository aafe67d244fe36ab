"""The engine of worker_openai: each sample of a generate task is one streamed request to the upstream.

n samples are n concurrent requests with n=1 (each seeded with derive_seed(seed, i) when the task is
seeded), so every sample streams, finishes and is cancelled on its own, and --max-concurrency counts what the
upstream really carries. Cancelling a task cancels its requests' asyncio tasks, which closes their HTTP
responses: the upstream sees the client go away and aborts.

A task whose samples do not fit the free slots is refused with RESOURCE_EXHAUSTED, unless --max-queued lets it wait:
then it waits for all n slots at once (gang: never part of them), and when slots free up the waiting tasks start in
the --scheduling order, strictly from the head (a task that would fit does not overtake the head that does not):
fcfs is arrival; run_las is worker_runtime.run_order's order of runs (higher priority, then the lower service level
of the tokens the run had consumed when the task was sent, then arrival), and a task waiting longer than
STARVATION_S goes first whatever its run.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from opentelemetry import propagate, trace

from trellis_rpc.errors import StatusError, internal, invalid, resource_exhausted, unavailable
from trellis_rpc.sampling import SamplingConfig, derive_seed
from worker_openai.chunks import Piece, parse_choice
from worker_openai.prompts import KeptPrompts, UpstreamPrompt, appended_text, render
from worker_openai.sampling_fields import UpstreamKind, sampling_fields
from worker_openai.upstream import Upstream
from worker_runtime.engine_api import (
    CompletionOut,
    Delta,
    EngineInfo,
    Finished,
    LoadStats,
    PromptInput,
    RunInfo,
    SequenceSource,
    TokenLogprob,
)
from worker_runtime.run_order import run_rank
from worker_runtime.stop_strings import StopStringMatcher
from worker_runtime.text_end import trim_cut_character


def _end_of_upstream_text(text: str) -> str:
    """The end of a sample's text: a server that decodes whole sequences (or flushes its detokenizer) renders a
    character it cut at the limit, or before a stop token, as a trailing U+FFFD. The worker has only that text,
    not the bytes (an upstream streams no token bytes), so a trailing run of U+FFFD at the end of a sequence is
    dropped: a model writing U+FFFD as its very last character is far rarer than a cut, and a client concatenating
    deltas or parsing JSON must not get a character the model never produced. Mid-stream the run is only held
    back (StopStringMatcher), and released as it is when more text follows: the model really wrote that."""
    return trim_cut_character(text)


@dataclass
class _Sample:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str = ""
    stop_reason: str = ""
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0

    def add(self, piece: Piece) -> None:
        self.text += piece.text
        self.token_ids += piece.token_ids
        self.logprobs += piece.logprobs
        self.finish_reason = piece.finish_reason or self.finish_reason
        self.stop_reason = piece.stop_reason or self.stop_reason


STARVATION_S = 10.0   # a task waiting longer than this starts first under run_las (as torch_engine's scheduler)


@dataclass
class _Waiting:
    """A task waiting for its n slots; `granted` resolves once they are taken for it."""
    task_id: str
    n: int
    run: RunInfo | None
    arrived: float            # time.monotonic(): queue time and the starvation bound
    order: int                # arrival order (ties of the clock broken)
    granted: asyncio.Future


@dataclass
class _Task:
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    requests: list[asyncio.Task] = field(default_factory=list)
    first_token_at: float | None = None


class OpenAIEngine:
    def __init__(self, upstream: Upstream, kind: UpstreamKind, model: str, *, tokenizer=None,
                 chat_only: bool = False, max_concurrency: int = 64, max_context_tokens: int = 0,
                 served_model_id: str = "", scheduling: str = "fcfs", max_queued: int = 0,
                 starvation_s: float = STARVATION_S) -> None:
        if scheduling not in ("fcfs", "run_las"):
            raise ValueError(f"scheduling: one of fcfs, run_las, got {scheduling!r}")
        self.upstream = upstream
        self.kind = kind
        self.model = model
        self.tokenizer = tokenizer
        self.chat_only = chat_only
        self.max_concurrency = max_concurrency
        self.kept = KeptPrompts()
        self.in_flight = 0
        self.scheduling = scheduling
        self.max_queued = max_queued
        self.starvation_s = starvation_s
        self._waiting: dict[str, _Waiting] = {}
        self._arrivals = itertools.count()
        self._tasks: dict[str, _Task] = {}
        self.info = EngineInfo(
            model_id=served_model_id or model, engine=f"openai-compatible ({kind.name})",
            max_context_tokens=max_context_tokens, max_batch_size=max_concurrency,
            eos_token=getattr(tokenizer, "eos_token", "") or "", keeps_sequences=True,
            scheduling=scheduling)

    # ---- the Engine protocol ---------------------------------------------------------------------------

    async def generate(self, task_id: str, prompt: PromptInput, sampling: SamplingConfig,
                       source: SequenceSource | None = None,
                       keep_ttl_s: float | None = None,
                       run: RunInfo | None = None) -> AsyncIterator[Delta | Finished]:
        started = time.monotonic()
        base = self._prompt(prompt, source)
        bodies = [self._body(base, sampling, i) for i in range(sampling.n)]   # refuses before anything is sent
        waited = await self._slots(task_id, sampling.n, run)
        if waited is None:     # cancelled while waiting: it took no slots and sent nothing
            now = time.monotonic()
            samples = [_Sample(i) for i in range(sampling.n)]
            yield self._finished(task_id, _Task(first_token_at=now), base, samples, started, None,
                                 queue_ms=(now - started) * 1000.0)
            return
        try:
            if source is not None and not source.fork:
                self.kept.use_up(source.handle)   # only now: a refused continuation leaves its sequence kept
        except BaseException:
            self._return_slots(sampling.n)
            raise
        headers: dict[str, str] = {}
        propagate.inject(headers)   # traceparent: the upstream's own spans join the run's trace
        span = trace.get_current_span()
        if span.is_recording():
            span.set_attribute("trellis.upstream", f"{self.kind.name} {self.upstream.config.base_url}")
        task = _Task()
        self._tasks[task_id] = task
        samples = [_Sample(i) for i in range(sampling.n)]
        for sample, body in zip(samples, bodies, strict=True):
            request = asyncio.create_task(self._request(task, sample, body, headers, sampling.stop))
            request.add_done_callback(lambda r, s=sample: self._request_ended(task, s, r))
            task.requests.append(request)
        try:
            pending = sampling.n
            while pending:
                kind, index, item = await task.events.get()
                if kind == "delta":
                    if task.first_token_at is None:
                        task.first_token_at = time.monotonic()
                    yield Delta(index, item.text, item.token_ids, item.logprobs, item.finish_reason)
                elif kind == "error":
                    raise item
                else:
                    pending -= 1
        finally:
            self._tasks.pop(task_id, None)
            for request in task.requests:
                request.cancel()
        yield self._finished(task_id, task, base, samples, started, keep_ttl_s, queue_ms=waited * 1000.0)

    def cancel(self, task_id: str) -> None:
        waiting = self._waiting.pop(task_id, None)
        if waiting is not None:
            if not waiting.granted.done():
                waiting.granted.set_result(False)
            self._dispatch()
        task = self._tasks.get(task_id)
        if task is not None:
            for request in task.requests:
                request.cancel()

    def release(self, task_prefix: str) -> None:
        self.kept.release(task_prefix)

    def load(self) -> LoadStats:
        runs = {w.run.run_id if w.run is not None else w.task_id for w in self._waiting.values()}
        return LoadStats(queue_depth=len(self._waiting), running_sequences=self.in_flight, kv_blocks_used=0,
                         kv_blocks_free=0, kept_sequences=len(self.kept), waiting_runs=len(runs))

    # ---- the upstream slots, and the tasks waiting for them ----------------------------------------------

    async def _slots(self, task_id: str, n: int, run: RunInfo | None) -> float | None:
        """Take n slots for the task, waiting for them if --max-queued allows: the seconds waited, or None when
        the task was cancelled (engine.cancel) while waiting. Cancelling the caller leaves the queue too."""
        if not self._waiting and self.in_flight + n <= self.max_concurrency:
            self.in_flight += n
            return 0.0
        if self.max_queued <= 0 or n > self.max_concurrency:
            raise resource_exhausted(f"this worker has {self.in_flight} of its {self.max_concurrency} upstream "
                                     f"requests in flight; the task needs {n}")
        if len(self._waiting) >= self.max_queued:
            raise resource_exhausted(f"this worker's upstream slots and queue are full: {self.in_flight} of its "
                                     f"{self.max_concurrency} requests in flight, {len(self._waiting)} of its "
                                     f"{self.max_queued} tasks waiting; the task needs {n}")
        arrived = time.monotonic()
        waiting = _Waiting(task_id, n, run, arrived, next(self._arrivals), asyncio.get_running_loop().create_future())
        self._waiting[task_id] = waiting
        self._dispatch()
        try:
            granted = await waiting.granted
        except BaseException:   # the consumer went away: leave the queue, or give back slots granted meanwhile
            if self._waiting.pop(task_id, None) is None and waiting.granted.done() \
                    and not waiting.granted.cancelled() and waiting.granted.result():
                self.in_flight -= n
            self._dispatch()
            raise
        return time.monotonic() - arrived if granted else None

    def _dispatch(self) -> None:
        """Start waiting tasks from the head of the order while the head's n slots are free."""
        while self._waiting:
            now = time.monotonic()
            head = min(self._waiting.values(), key=lambda w: self._rank(w, now))
            if self.in_flight + head.n > self.max_concurrency:
                return
            del self._waiting[head.task_id]
            self.in_flight += head.n
            head.granted.set_result(True)

    def _rank(self, waiting: _Waiting, now: float) -> tuple:
        if self.scheduling != "run_las":
            return (waiting.order,)
        return run_rank(waiting.run, now - waiting.arrived, waiting.order, self.starvation_s)

    def _return_slots(self, n: int) -> None:
        self.in_flight -= n
        self._dispatch()

    # ---- one task --------------------------------------------------------------------------------------

    def _prompt(self, prompt: PromptInput, source: SequenceSource | None) -> UpstreamPrompt:
        if source is not None:
            base = self.kept.get(source.handle).extended(appended_text(prompt), self.tokenizer)
        else:
            base = render(prompt, self.tokenizer)
        if base.chat and base.continue_final and not self.kind.chat_continuation:
            raise invalid("prompt.chat.continue_final_message",
                          f"continuing a chat's final message needs --tokenizer on this worker (the upstream, "
                          f"{self.kind.name}, cannot continue a message through /chat/completions)")
        if base.token_ids is not None and not self.kind.token_prompts:
            if self.tokenizer is None:
                raise invalid("prompt.token_ids", f"the upstream ({self.kind.name}) takes text prompts only; "
                                                  f"send text, or give this worker --tokenizer to decode ids")
            base = UpstreamPrompt(text=self.tokenizer.decode(list(base.token_ids)))
        if self.chat_only and not base.chat:
            raise invalid("prompt.text", "this worker's upstream has only /chat/completions (--chat-only): send "
                                         "prompt.chat")
        return base

    def _body(self, prompt: UpstreamPrompt, cfg: SamplingConfig, index: int) -> dict:
        seed = derive_seed(cfg.seed, index) if cfg.seed is not None and cfg.n > 1 else cfg.seed
        body = {"model": self.model, **prompt.body(), **sampling_fields(self.kind, cfg, seed),
                "n": 1, "stream": True, "stream_options": {"include_usage": True}}
        if cfg.logprobs is not None:
            if prompt.chat:
                body.update(logprobs=True, top_logprobs=cfg.logprobs)
            else:
                body["logprobs"] = cfg.logprobs
            if self.kind.token_ids_in_logprobs:
                body[self.kind.token_ids_in_logprobs] = True
        if prompt.chat and prompt.continue_final:
            body.update(continue_final_message=True, add_generation_prompt=False)
        return body

    async def _request(self, task: _Task, sample: _Sample, body: dict, headers: dict[str, str],
                       stops: tuple[str, ...]) -> None:
        path = "chat/completions" if "messages" in body else "completions"
        # Stop strings are also applied here: servers differ on whether the stop string stays in the text
        # (transformers serve keeps it, vLLM drops it), and streamed text must never show what the result drops.
        matcher = StopStringMatcher(stops)
        try:
            async with self.upstream.stream(path, body, headers) as events:
                async for event in events:
                    self._usage(sample, event.get("usage"))
                    for choice in event.get("choices") or []:
                        piece = parse_choice(choice, self.tokenizer)
                        piece.text = matcher.feed(piece.text)
                        if matcher.matched:
                            piece.finish_reason, piece.stop_reason = "stop", matcher.matched
                        elif piece.finish_reason:
                            piece.text += matcher.flush(_end_of_upstream_text)
                        if piece.text or piece.token_ids or piece.finish_reason:
                            sample.add(piece)
                            task.events.put_nowait(("delta", sample.index, piece))
                    if matcher.matched:
                        break    # leaving the block closes the response: the upstream stops generating
            if not sample.finish_reason:
                raise unavailable("upstream ended the stream before the sample finished")
        except StatusError as err:
            task.events.put_nowait(("error", sample.index, err))
        except Exception as exc:   # a chunk this worker cannot read must fail the task, not hang it
            task.events.put_nowait(("error", sample.index, internal(f"reading the upstream's stream: {exc!r}")))

    def _request_ended(self, task: _Task, sample: _Sample, request: asyncio.Task) -> None:
        """A done callback, so a request cancelled before it ever ran still returns its slot and reports."""
        self._return_slots(1)
        if request.cancelled():
            sample.finish_reason = sample.finish_reason or "cancelled"
        task.events.put_nowait(("done", sample.index, None))

    @staticmethod
    def _usage(sample: _Sample, usage: dict | None) -> None:
        if not usage:
            return
        sample.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        details = usage.get("prompt_tokens_details") or {}
        sample.cached_prompt_tokens = int(details.get("cached_tokens") or 0)

    def _finished(self, task_id: str, task: _Task, base: UpstreamPrompt, samples: list[_Sample], started: float,
                  keep_ttl_s: float | None, queue_ms: float = 0.0) -> Finished:
        now = time.monotonic()
        handles = []
        if keep_ttl_s is not None:
            for s in samples:
                handle = f"{task_id}/{s.index}"
                self.kept.keep(handle, base.extended(s.text, self.tokenizer), keep_ttl_s)
                handles.append(handle)
        return Finished(
            completions=[CompletionOut(index=s.index, text=s.text, token_ids=s.token_ids,
                                       finish_reason=s.finish_reason or "cancelled", stop_reason=s.stop_reason,
                                       logprobs=s.logprobs, cumulative_logprob=sum(lp.logprob for lp in s.logprobs))
                         for s in samples],
            prompt_tokens=max((s.prompt_tokens for s in samples), default=0),
            cached_prompt_tokens=max((s.cached_prompt_tokens for s in samples), default=0),
            queue_ms=queue_ms,
            ttft_ms=((task.first_token_at or now) - started) * 1000.0,
            latency_ms=(now - started) * 1000.0,
            handles=handles,
            # The worker's spans show the upstream's time to the first token (prefill) and its streaming
            # after it (decode, one step per token of the longest sample).
            prefill_batch_size=len(samples),
            decode_steps=max((len(s.token_ids) for s in samples), default=1) - 1,
            decode_batch_mean=float(len(samples)))
