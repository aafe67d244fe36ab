"""Mirrors tensorrt_llm/executor/executor.py's GenerationExecutor interface (generate_async, abort_request,
get_stats, aget_stats, get_kv_cache_capacity, shutdown). Upstream it fronts a PyExecutor in worker
processes; here it IS the engine: one background thread runs iterations over a Hugging Face model on the
CPU and answers each result's queue, like the PyTorch backend does:

- iteration = admit waiting requests (FCFS; max_batch_size counts sequences, i.e. child requests;
  max_num_tokens bounds new context tokens plus generation tokens; GUARANTEED_NO_EVICT reserves a
  request's worst-case KV blocks), then one forward per active request (prefill, or one decode step for
  all of its best_of rows), one token sampled per unfinished row;
- streaming: a response per sequence whenever it has stream_interval new tokens (the first token at once)
  or finishes; non-streaming: one response per sequence when it finishes; `is_final` on the last one;
- abort: at the next iteration every unfinished sequence answers once more, finish reason CANCELLED
  (also for a request still waiting; upstream that path is unverified and may never answer);
- iteration stats (enable_iter_perf_stats=True): one JSON record per iteration, camelCase keys as in the
  executor's JSON contract (counts are sequences). KV blocks are bookkeeping only.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

from .._torch.pyexecutor import sampler
from ..bindings.executor import FinishReason, Response, Result
from .params.sampling import SamplingParams
from .result import GenerationResult, IterationResult, Logprob

logger = logging.getLogger("tensorrt_llm")

# Stand-in for "GPU memory" when KvCacheConfig.max_tokens is unset: capacity = fraction x this many tokens.
FAKE_KV_TOKENS_AT_FULL_MEMORY = 65536


def _seed_for(seed: int, index: int) -> int:
    """Sample i of a seeded request draws from its own stream, distinct per (seed, i)."""
    return (seed + index * 0x9E3779B97F4A7C15) % (2**63)


@dataclass
class _Seq:
    index: int
    generator: torch.Generator
    tokens: list[int] = field(default_factory=list)       # generated, stop words included, end id excluded
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    cum_logprob: float = 0.0
    gen_logits: list[torch.Tensor] = field(default_factory=list)
    feed: int = 0                                        # next decode input (the last sampled token)
    finish: FinishReason = FinishReason.NOT_FINISHED
    sent_tokens: int = 0
    sent_logprobs: int = 0
    answered: bool = False                               # has sent at least one response

    @property
    def done(self) -> bool:
        return self.finish != FinishReason.NOT_FINISHED


@dataclass
class _Request:
    id: int
    prompt: list[int]
    params: SamplingParams
    streaming: bool
    result: GenerationResult
    arrival: float
    cache_salt: str | None
    seqs: list[_Seq]
    prefilled: bool = False
    past: Any = None
    decode_steps: int = 0
    context_logits: torch.Tensor | None = None
    prompt_logprobs: list | None = None
    reserved_blocks: int = 0
    reused_blocks: int = 0
    missed_blocks: int = 0
    cached_tokens: int = 0

    def unfinished(self) -> list[_Seq]:
        return [s for s in self.seqs if not s.done]


class GenerationExecutor:
    def __init__(self, model: torch.nn.Module, model_kind: str, args: Any, max_seq_len: int) -> None:
        self.model = model
        self.model_kind = model_kind            # "causal", "sequence" (outcome RM) or "token" (process RM)
        self.args = args
        self.max_seq_len = max_seq_len
        kv = args.kv_cache_config
        self.tokens_per_block = kv.tokens_per_block
        capacity = kv.max_tokens
        if capacity is None:
            capacity = int((kv.free_gpu_memory_fraction if kv.free_gpu_memory_fraction is not None else 0.9)
                           * FAKE_KV_TOKENS_AT_FULL_MEMORY)
        self.max_blocks = max(1, capacity // self.tokens_per_block)
        self.step_delay_s = 0.0
        self._ids = itertools.count(1)
        self._cv = threading.Condition()
        self._waiting: list[_Request] = []
        self._active: list[_Request] = []
        self._aborts: set[int] = set()
        self._stopping = False
        self._shutdown = False
        self._generator = torch.Generator().manual_seed(0)   # unseeded requests share one stream
        self._block_cache: OrderedDict[int, None] = OrderedDict()
        self._reused_total = 0
        self._missed_total = 0
        self._alloc_total = 0
        self._alloc_new = 0
        self._iter = 0
        self._submitted_any = False
        self._stats = IterationResult()
        self._thread = threading.Thread(target=self._run, name="tensorrt_llm-fake-executor", daemon=True)
        self._thread.start()

    # ---- the client side ---------------------------------------------------------------------------

    def generate_async(self, prompt_token_ids: list[int], sampling_params: SamplingParams, streaming: bool = False,
                       cache_salt: str | None = None, **_: Any) -> GenerationResult:
        request_id = next(self._ids)
        result = GenerationResult(request_id, list(prompt_token_ids), sampling_params, streaming, executor=self)
        seqs = []
        for i in range(sampling_params.best_of):
            if sampling_params.seed is not None:
                gen = torch.Generator().manual_seed(_seed_for(sampling_params.seed, i))
            else:
                gen = self._generator
            seqs.append(_Seq(index=i, generator=gen))
        request = _Request(id=request_id, prompt=list(prompt_token_ids), params=sampling_params, streaming=streaming,
                           result=result, arrival=time.perf_counter(), cache_salt=cache_salt, seqs=seqs)
        with self._cv:
            if self._stopping:
                raise RuntimeError("LLM is shutting down")
            self._waiting.append(request)
            self._submitted_any = True
            self._stats.mark_undone()
            self._cv.notify_all()
        return result

    def abort_request(self, request_id: int) -> None:
        with self._cv:
            self._aborts.add(request_id)
            self._cv.notify_all()

    def get_stats(self, timeout: float | None = 2) -> list[dict]:
        if not self._submitted_any:
            logger.warning("No requests have been submitted yet; there are no iteration stats.")
            return []
        self._stats.set_timeout(timeout)
        return self._stats.get_results()

    def aget_stats(self, timeout: float | None = 2) -> IterationResult:
        self._stats.set_timeout(timeout)
        return self._stats

    def get_kv_cache_capacity(self) -> dict:
        return {"maxNumBlocks": self.max_blocks, "tokensPerBlock": self.tokens_per_block,
                "maxNumTokens": self.max_blocks * self.tokens_per_block}

    def is_shutdown(self) -> bool:
        return self._shutdown

    def check_health(self) -> bool:
        return not self._shutdown and self._thread.is_alive()

    def shutdown(self) -> None:
        """Stop the engine thread. Requests still in flight answer 'cancelled' so no reader hangs."""
        with self._cv:
            if self._stopping:
                return
            self._stopping = True
            self._cv.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=30)
        for request in self._active + self._waiting:
            self._cancel(request)
        self._active, self._waiting = [], []
        self._shutdown = True

    # ---- the engine thread -------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cv:
                while not (self._stopping or self._waiting or self._active or self._aborts):
                    self._cv.wait()
                if self._stopping:
                    return
                aborts, self._aborts = self._aborts, set()
                cancelled_waiting = [r for r in self._waiting if r.id in aborts]
                self._waiting = [r for r in self._waiting if r.id not in aborts]
                admitted = self._admit()
                queued = sum(len(r.seqs) for r in self._waiting)
            started = time.perf_counter()
            cancelled = [r for r in self._active if r.id in aborts] + cancelled_waiting
            for request in cancelled:
                self._cancel(request)
                self._release(request)
            self._iteration(admitted, started, queued, len(cancelled))

    def _admit(self) -> list[_Request]:
        """FCFS admission (under the lock): batch slots, token budget and KV reservation."""
        admitted: list[_Request] = []
        running = sum(len(r.unfinished()) for r in self._active)
        tokens = running
        reserved = sum(r.reserved_blocks for r in self._active)
        while self._waiting:
            request = self._waiting[0]
            width = len(request.seqs)
            need = width * math.ceil(min(len(request.prompt) + request.params.max_tokens, self.max_seq_len)
                                     / self.tokens_per_block)
            busy = bool(self._active or admitted)
            if busy and (running + width > self.args.max_batch_size
                         or tokens + len(request.prompt) > self.args.max_num_tokens
                         or reserved + need > self.max_blocks):
                break
            self._waiting.pop(0)
            request.reserved_blocks = need
            running += width
            tokens += len(request.prompt)
            reserved += need
            self._account_prefix(request)
            self._active.append(request)
            admitted.append(request)
        return admitted

    def _account_prefix(self, request: _Request) -> None:
        """Block-reuse bookkeeping: chained hashes of the prompt's full blocks (salted by cache_salt)."""
        tpb = self.tokens_per_block
        parent = hash(request.cache_salt)
        full = len(request.prompt) // tpb
        for b in range(full):
            parent = hash((parent, tuple(request.prompt[b * tpb:(b + 1) * tpb])))
            if self.args.kv_cache_config.enable_block_reuse and parent in self._block_cache:
                self._block_cache.move_to_end(parent)
                request.reused_blocks += 1
            else:
                request.missed_blocks += 1
                self._block_cache[parent] = None
                while len(self._block_cache) > self.max_blocks:
                    self._block_cache.popitem(last=False)
        partial = 1 if len(request.prompt) % tpb else 0
        request.missed_blocks += partial
        request.cached_tokens = request.reused_blocks * tpb
        self._reused_total += request.reused_blocks
        self._missed_total += request.missed_blocks
        self._alloc_total += full + partial
        self._alloc_new += request.missed_blocks

    def _iteration(self, admitted: list[_Request], started: float, queued: int, cancelled: int) -> None:
        ctx_requests = ctx_tokens = gen_requests = 0
        scheduled = [r for r in self._active]
        for request in scheduled:
            width = len(request.unfinished())
            if not request.prefilled:
                ctx_requests += width
                ctx_tokens += len(request.prompt) * width
            else:
                gen_requests += width
            try:
                with torch.no_grad():
                    self._step(request)
            except Exception as exc:  # a bad request must not take the engine down
                logger.warning("request %s failed: %r", request.id, exc)
                request.result.queue.put(Response(request.id, error_msg=f"{type(exc).__name__}: {exc}"))
                for seq in request.seqs:
                    seq.finish = seq.finish or FinishReason.CANCELLED
        finished = [r for r in self._active if not r.unfinished()]
        for request in finished:
            self._release(request)
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        self._iter += 1
        if self.args.enable_iter_perf_stats and scheduled:
            self._record(started, admitted, scheduled, queued, len(finished) + cancelled, ctx_requests, ctx_tokens,
                         gen_requests)

    def _release(self, request: _Request) -> None:
        if request in self._active:
            self._active.remove(request)
        request.past = None

    # ---- one request, one step ------------------------------------------------------------------------

    def _forward_rows(self, request: _Request) -> torch.Tensor:
        """Last-position logits [rows, vocab] for every row of the request (finished rows included)."""
        rows = len(request.seqs)
        if self.model_kind != "causal":
            # Reward models: the label head's per-token output; no KV cache, the whole sequence each step.
            out = []
            for seq in request.seqs:
                per_token = self._head_logits(request.prompt + seq.tokens)
                if not request.prefilled:
                    request.context_logits = per_token[:len(request.prompt)].float().clone()
                out.append(per_token[-1])
            return torch.stack(out)
        if not request.prefilled:
            ids = torch.tensor([request.prompt] * rows, dtype=torch.long)
            out = self.model(input_ids=ids, use_cache=True)
            if request.params.return_context_logits or request.params.prompt_logprobs is not None:
                request.context_logits = out.logits[0].float().clone()
        else:
            ids = torch.tensor([[seq.feed] for seq in request.seqs], dtype=torch.long)
            out = self.model(input_ids=ids, past_key_values=request.past, use_cache=True)
        request.past = out.past_key_values
        return out.logits[:, -1]

    def _head_logits(self, ids: list[int]) -> torch.Tensor:
        base = getattr(self.model, self.model.base_model_prefix)
        hidden = base(input_ids=torch.tensor([ids], dtype=torch.long)).last_hidden_state
        return self.model.score(hidden)[0]

    def _step(self, request: _Request) -> None:
        sp = request.params
        first = not request.prefilled
        logits = self._forward_rows(request)
        request.prefilled = True
        request.decode_steps += 1
        if first and sp.prompt_logprobs is not None:
            request.prompt_logprobs = self._prompt_logprobs(request)
        emit: list[_Seq] = []
        for seq in request.unfinished():
            out = sampler.sample(logits[seq.index], sp, request.prompt, seq.tokens, seq.generator)
            seq.feed = out.token
            end_id = -1 if sp.ignore_eos else sp.end_id
            if out.token != end_id:
                seq.tokens.append(out.token)
                seq.cum_logprob += out.logprob
                if out.top is not None:
                    seq.logprobs.append(out.top)
                if sp.return_generation_logits:
                    seq.gen_logits.append(logits[seq.index].float().clone())
            seq.finish = sampler.stop_reason(out.token, sp, request.prompt + seq.tokens, len(seq.tokens),
                                             self.max_seq_len)
            fresh = len(seq.tokens) - seq.sent_tokens
            if seq.done or (request.streaming and fresh and (not seq.answered
                                                             or fresh >= (sp._stream_interval or 1))):
                emit.append(seq)
        final = not request.unfinished()
        for i, seq in enumerate(emit):
            self._respond(request, seq, is_final=final and i == len(emit) - 1)

    def _prompt_logprobs(self, request: _Request) -> list:
        # As upstream's compute_logprobs(context_logits, k, prompt_token_ids): row t scored at prompt token t.
        logprobs = torch.log_softmax(request.context_logits, dim=-1)
        k = request.params.prompt_logprobs
        return [sampler.token_logprobs(logprobs[t], k, tok) for t, tok in enumerate(request.prompt)]

    def _respond(self, request: _Request, seq: _Seq, is_final: bool) -> None:
        sp = request.params
        want_logprobs = sp.logprobs is not None
        gen_logits = None
        if sp.return_generation_logits and seq.gen_logits:
            gen_logits = torch.stack(seq.gen_logits)[None]
        result = Result(
            is_final=is_final, sequence_index=seq.index, output_token_ids=[seq.tokens[seq.sent_tokens:]],
            finish_reasons=[seq.finish], is_sequence_final=seq.done,
            # cum_log_probs come with logprobs, and always when best_of > n (the n best are picked by it).
            cum_log_probs=[seq.cum_logprob] if want_logprobs or sp.best_of > sp.n else None,
            log_probs=[seq.logprobs[seq.sent_logprobs:]] if want_logprobs else None,
            context_logits=request.context_logits if sp.return_context_logits else None,
            generation_logits=gen_logits, prompt_logprobs=request.prompt_logprobs,
            decoding_iter=request.decode_steps, cached_tokens=request.cached_tokens)
        seq.sent_tokens = len(seq.tokens)
        seq.sent_logprobs = len(seq.logprobs)
        seq.answered = True
        request.result.queue.put(Response(request.id, result))

    def _cancel(self, request: _Request) -> None:
        unfinished = request.unfinished()
        for seq in unfinished:
            seq.finish = FinishReason.CANCELLED
        for i, seq in enumerate(unfinished):
            self._respond(request, seq, is_final=i == len(unfinished) - 1)

    # ---- iteration stats ------------------------------------------------------------------------------

    def _used_blocks(self) -> int:
        tpb = self.tokens_per_block
        used = 0
        for request in self._active:
            shared = len(request.prompt) // tpb
            used += shared + sum(math.ceil((len(request.prompt) + len(s.tokens)) / tpb) - shared
                                 for s in request.seqs)
        return used

    def _record(self, started: float, admitted: list[_Request], scheduled: list[_Request], queued: int,
                completed: int, ctx_requests: int, ctx_tokens: int, gen_requests: int) -> None:
        now = time.perf_counter()
        used = min(self._used_blocks(), self.max_blocks)
        lookups = self._reused_total + self._missed_total
        queue_ms = [(started - r.arrival) * 1000 for r in admitted]
        record: dict[str, Any] = {
            "timestamp": time.strftime("%m-%d-%Y %H:%M:%S"),
            "iter": self._iter - 1,
            "iterLatencyMS": (now - started) * 1000,
            "newActiveRequestsQueueLatencyMS": sum(queue_ms) / len(queue_ms) if queue_ms else 0.0,
            "numNewActiveRequests": sum(len(r.seqs) for r in admitted),
            "numActiveRequests": ctx_requests + gen_requests,
            "numQueuedRequests": queued,
            "numCompletedRequests": completed,
            "maxNumActiveRequests": self.args.max_batch_size,
            "maxBatchSizeStatic": self.args.max_batch_size,
            "maxBatchSizeTunerRecommended": self.args.max_batch_size,
            "maxBatchSizeRuntime": self.args.max_batch_size,
            "maxNumTokensStatic": self.args.max_num_tokens,
            "maxNumTokensTunerRecommended": self.args.max_num_tokens,
            "maxNumTokensRuntime": self.args.max_num_tokens,
            "gpuMemUsage": 0,
            "cpuMemUsage": 0,
            "pinnedMemUsage": 0,
            "kvCacheStats": {
                "maxNumBlocks": self.max_blocks,
                "freeNumBlocks": self.max_blocks - used,
                "usedNumBlocks": used,
                "tokensPerBlock": self.tokens_per_block,
                "allocTotalBlocks": self._alloc_total,
                "allocNewBlocks": self._alloc_new,
                "reusedBlocks": self._reused_total,
                "missedBlocks": self._missed_total,
                "cacheHitRate": self._reused_total / lookups if lookups else 0.0,
            },
            "staticBatchingStats": None,
            "inflightBatchingStats": {
                "numScheduledRequests": ctx_requests + gen_requests,
                "numContextRequests": ctx_requests,
                "numGenRequests": gen_requests,
                "numPausedRequests": 0,
                "numCtxTokens": ctx_tokens,
                "microBatchId": 0,
                "avgNumDecodedTokensPerIter": 1.0 if gen_requests else 0.0,
            },
            "specDecodingStats": None,
        }
        if self.args.enable_iter_req_stats:
            record["requestStats"] = [self._request_stats(r) for r in scheduled]
        self._stats.queue.put(json.dumps(record))
        # max_stats_len bounds what waits unread: drop the oldest records.
        while len(self._stats.aqueue) > self.args.max_stats_len:
            try:
                self._stats.queue.get(timeout=0)
            except Exception:
                break

    def _request_stats(self, request: _Request) -> dict:
        generated = max((len(s.tokens) for s in request.seqs), default=0)
        done = not request.unfinished()
        lookups = request.reused_blocks + request.missed_blocks
        return {
            "id": request.id,
            "stage": "GENERATION_COMPLETE" if done else "GENERATION_IN_PROGRESS",
            "contextPrefillPosition": len(request.prompt),
            "numGeneratedTokens": generated,
            "avgNumDecodedTokensPerIter": 1.0,
            "scheduled": True,
            "paused": False,
            "disServingStats": None,
            "allocTotalBlocksPerRequest": lookups,
            "allocNewBlocksPerRequest": request.missed_blocks,
            "reusedBlocksPerRequest": request.reused_blocks,
            "missedBlocksPerRequest": request.missed_blocks,
            "kvCacheHitRatePerRequest": request.reused_blocks / lookups if lookups else 0.0,
        }
