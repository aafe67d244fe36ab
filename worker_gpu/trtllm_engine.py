"""The GPU engine: TensorRT-LLM's LLM API (PyTorch backend) behind the worker contract
(worker_runtime.engine_api.Engine).

One `generate_async(prompt_token_ids, SamplingParams, streaming=True)` per task; each streamed step's
`outputs[i].token_ids_diff` / `text_diff` / `logprobs_diff` become a Delta for sample i, so tokens reach
the router as TensorRT-LLM produces them. Cancel calls `RequestOutput.abort()`. TensorRT-LLM batches
in flight and reuses KV blocks of shared prefixes (`KvCacheConfig(enable_block_reuse=True)`); it keeps
no sequences under handles, so continue/fork tasks are not offered (a controller re-sends the prefix,
which block reuse makes cheap). Load reports come from the executor's iteration statistics
(`get_stats_async`: kvCacheStats, numQueuedRequests, numActiveRequests).

Stop strings are passed to TensorRT-LLM (so generation stops on the GPU) and also matched here on the
streamed text, so a client never sees the start of a stop string that the final text drops.

TensorRT-LLM's own incremental detokenizer (TLLM_INCREMENTAL_DETOKENIZATION_BACKEND=TRTLLM, or any stream_interval
from TLLM_STREAM_INTERVAL_THRESHOLD up) flushes a character the sequence cut short as U+FFFD; the end of each
sample's text goes through worker_runtime.text_end like every worker's, with the bytes of its token ids.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import structlog

from trellis_rpc.errors import context_exceeded, deadline_exceeded, invalid, not_found
from trellis_rpc.sampling import SamplingConfig
from worker_gpu.trtllm_sampling import Support, allow_greedy_n, trtllm_kwargs
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
    TopLogprob,
)
from worker_runtime.prompts import check_token_ids, encode_prompt
from worker_runtime.run_order import bounded_priority
from worker_runtime.stop_strings import StopStringMatcher
from worker_runtime.text_end import trailing_replacements, trim_cut_character

log = structlog.get_logger(__name__)

# TensorRT-LLM's CompletionOutput.finish_reason ("stop" | "length" | "timeout" | "cancelled") as ours;
# "timeout" fails the task instead.
_TRTLLM_FINISH = {"stop": "stop", "length": "length", "cancelled": "cancelled"}
STATS_STALE_S = 2.0


def model_context(model_dir: Path) -> int:
    """The model's context length from its config.json (0 when it does not say)."""
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return 0
    config = config.get("text_config", config)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        if isinstance(config.get(name), int) and config[name] > 0:
            return config[name]
    return 0


class TrtLlmEngine:
    def __init__(self, llm, sampling_params_cls, model_id: str, model_dir: Path, max_batch_size: int,
                 version: str) -> None:
        self.llm = llm
        self.SamplingParams = sampling_params_cls
        self.support = Support.of(version)
        # A request priority in [0, 1] orders TensorRT-LLM's waiting queue: the run order (priority class, then
        # least attained service) as one number (worker_runtime.run_order). Older LLM APIs have no such argument.
        self._priority = "priority" in inspect.signature(llm.generate_async).parameters
        self.tokenizer = llm.tokenizer.tokenizer if hasattr(llm.tokenizer, "tokenizer") else llm.tokenizer
        self.vocab = len(self.tokenizer)
        self.max_context = getattr(llm.args, "max_seq_len", None) or model_context(model_dir) or 0
        self.info = EngineInfo(
            model_id=model_id, engine=f"tensorrt-llm-{version}", max_context_tokens=self.max_context,
            max_batch_size=max_batch_size, eos_token=self.tokenizer.eos_token or "", keeps_sequences=False)
        self._running: dict[str, object] = {}     # task id -> RequestOutput
        self._stats: dict = {}
        self._stats_at = 0.0
        self._stats_task: asyncio.Task | None = None

    # ---- prompts -------------------------------------------------------------------------------

    def tokenize(self, prompt: PromptInput) -> list[int]:
        return encode_prompt(self.tokenizer, prompt, self.vocab)

    # ---- generation ----------------------------------------------------------------------------

    async def generate(self, task_id: str, prompt: PromptInput, cfg: SamplingConfig,
                       source: SequenceSource | None = None,
                       keep_ttl_s: float | None = None,
                       run: RunInfo | None = None) -> AsyncIterator[Delta | Finished]:
        if source is not None:
            raise not_found("generate.source: a TensorRT-LLM worker keeps no "
                            "sequences; send the whole prompt", "generate.source")
        self._start_stats()
        check_token_ids(cfg.stop_token_ids, self.vocab, "sampling.stop_token_ids")
        ids = self.tokenize(prompt)
        if self.max_context and len(ids) >= self.max_context:
            raise context_exceeded("prompt", f"{len(ids)} tokens do not fit the model's context of "
                                             f"{self.max_context} tokens (at least one token must be left to generate)")
        params = self.SamplingParams(**trtllm_kwargs(cfg, self.support))
        submitted = time.perf_counter()
        try:
            extra = {"priority": bounded_priority(run)} if self._priority else {}
            output = self.llm.generate_async(ids, sampling_params=params, streaming=True, **extra)
        except ValueError as err:  # TensorRT-LLM's own checks on the request
            raise invalid("sampling", str(err)) from err
        self._running[task_id] = output
        samples = [_Sample(cfg, self._token_text, self.tokenizer) for _ in range(cfg.n)]
        first_token = 0.0
        try:
            async for step in output:
                for completion in step.outputs:
                    sample = samples[completion.index]
                    delta = sample.delta(completion)
                    if delta is None:
                        continue
                    if delta.token_ids and not first_token:
                        first_token = time.perf_counter()
                    yield delta
            yield self._finished(samples, len(ids), submitted, first_token)
        finally:
            self._running.pop(task_id, None)
            if not output.finished:
                output.abort()  # the caller stopped reading (cancel, deadline, client gone)

    def _finished(self, samples: list[_Sample], prompt_tokens: int, submitted: float,
                  first_token: float) -> Finished:
        now = time.perf_counter()
        completions = [s.completion(i) for i, s in enumerate(samples)]
        ttft = ((first_token or now) - submitted) * 1000
        return Finished(completions=completions, prompt_tokens=prompt_tokens, cached_prompt_tokens=0,
                        queue_ms=0.0, ttft_ms=ttft, latency_ms=(now - submitted) * 1000)

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def cancel(self, task_id: str) -> None:
        output = self._running.get(task_id)
        if output is not None and not output.finished:
            output.abort()

    # ---- load ----------------------------------------------------------------------------------

    def _start_stats(self) -> None:
        if self._stats_task is None or self._stats_task.done():
            self._stats_task = asyncio.get_running_loop().create_task(self._poll_stats())

    async def _poll_stats(self) -> None:
        """Keep the newest iteration record. get_stats_async ends after a quiet spell; start it again."""
        while True:
            try:
                async for record in self.llm.get_stats_async(timeout=STATS_STALE_S):
                    self._stats = record if isinstance(record, dict) else json.loads(record)
                    self._stats_at = time.monotonic()
            except Exception as exc:  # stats are advisory: never let them take the worker down
                log.warning("engine stats unavailable", error=repr(exc))
                return
            await asyncio.sleep(0.1)

    def load(self) -> LoadStats:
        kv = self._stats.get("kvCacheStats") or {}
        if self._stats and time.monotonic() - self._stats_at < STATS_STALE_S:
            queued, running = self._stats.get("numQueuedRequests", 0), self._stats.get("numActiveRequests", 0)
        else:  # idle (no iterations, so no records): what this worker has in flight
            queued, running = 0, len(self._running)
        return LoadStats(queue_depth=queued, running_sequences=running, kv_blocks_used=kv.get("usedNumBlocks", 0),
                         kv_blocks_free=kv.get("freeNumBlocks", 0))

    def close(self) -> None:
        if self._stats_task is not None:
            self._stats_task.cancel()
        self.llm.shutdown()


class _Sample:
    """One of a task's n samples as TensorRT-LLM streams it: each step's new part becomes a Delta.

    New parts are sliced from the cumulative `token_ids` / `text` / `logprobs` at this sample's own
    offsets rather than read from `token_ids_diff` & co.: with n > 1, TensorRT-LLM's responses update
    one sequence at a time, and a sequence the current response did not touch still shows its previous
    diff."""

    def __init__(self, cfg: SamplingConfig, token_text, tokenizer=None) -> None:
        self.cfg = cfg
        self.token_text = token_text
        self.tokenizer = tokenizer
        self.stops = StopStringMatcher(cfg.stop)
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.seen_text = 0
        self.seen_logprobs = 0
        self.cumulative_logprob = 0.0
        self.finish_reason = ""

    def delta(self, completion) -> Delta | None:
        if self.finish_reason:
            return None
        new_ids = list(completion.token_ids[len(self.token_ids):])
        self.token_ids += new_ids
        entries = completion.logprobs[self.seen_logprobs:]
        self.seen_logprobs = len(completion.logprobs)
        lps = self._logprobs(entries, new_ids)
        self.logprobs += lps
        full = completion.text
        # Mid-stream, a trailing U+FFFD is left unread: a detokenizer may still turn it into the character.
        end = len(full) if completion.finish_reason else len(full) - trailing_replacements(full)
        text = self.stops.feed(full[self.seen_text:end]) if end > self.seen_text else ""
        self.seen_text = max(self.seen_text, end)
        if completion.finish_reason:
            if completion.finish_reason == "timeout":
                raise deadline_exceeded("TensorRT-LLM timed the request out")
            self.finish_reason = _TRTLLM_FINISH.get(completion.finish_reason, "stop")
            if isinstance(completion.stop_reason, str) and not self.stops.matched:
                # TensorRT-LLM cut the text at a stop string we had only begun to see: its text is final.
                text += self.stops.stopped_at(completion.stop_reason, full)
            elif not self.stops.matched:
                text += self.stops.flush(self._end_of_text)
            else:
                self.finish_reason = "stop"
            if completion.cumulative_logprob is not None:
                self.cumulative_logprob = completion.cumulative_logprob
        if not new_ids and not text and not self.finish_reason:
            return None
        return Delta(completion.index, text, new_ids, lps if self.cfg.logprobs is not None else [],
                     self.finish_reason)

    def _end_of_text(self, text: str) -> str:
        return trim_cut_character(text, self.tokenizer, self.token_ids)

    def _logprobs(self, entries, new_ids: list[int]) -> list[TokenLogprob]:
        """TensorRT-LLM gives per token {token_id: Logprob(logprob, rank)}: the top K by rank plus the
        sampled token. Trellis keeps the sampled token's logprob and the top cfg.logprobs alternatives."""
        out = []
        for token, entry in zip(new_ids, entries or [], strict=False):
            if isinstance(entry, float):  # the "simple format": the sampled token's logprob only
                out.append(TokenLogprob(token, entry))
                self.cumulative_logprob += entry
                continue
            chosen = entry.get(token)
            value = chosen.logprob if chosen is not None else float("nan")
            self.cumulative_logprob += value if chosen is not None else 0.0
            ranked = sorted(((lp.rank or 0, tid, lp.logprob) for tid, lp in entry.items() if lp.rank),
                            key=lambda r: r[0])[:self.cfg.logprobs or 0]
            out.append(TokenLogprob(token, value, [TopLogprob(tid, v, self.token_text(tid)) for _, tid, v in ranked]))
        return out

    def completion(self, index: int) -> CompletionOut:
        return CompletionOut(index=index, text=self.stops.text, token_ids=self.token_ids,
                             finish_reason=self.finish_reason or "cancelled", stop_reason=self.stops.matched,
                             logprobs=self.logprobs if self.cfg.logprobs is not None else [],
                             cumulative_logprob=self.cumulative_logprob)


def build_trtllm(args: argparse.Namespace):
    """(engine, scorer) on TensorRT-LLM: the LLM for generation (and the verifier / PRM on its context
    logits), or a reward model's scorer."""
    allow_greedy_n()
    import tensorrt_llm
    from tensorrt_llm import LLM, SamplingParams
    from tensorrt_llm.llmapi import KvCacheConfig

    from torch_engine.model_loader import check_remote_code, resolve
    from worker_gpu.trtllm_scoring import reward_kind, scorer_for

    model_dir = resolve(args.model)
    if model_dir.is_file():  # the bundled .gguf: TensorRT-LLM loads Hugging Face directories
        from torch_engine.model_loader import convert_gguf

        model_dir = convert_gguf(model_dir)
    check_remote_code(args.model, args.trust_remote_code)
    llm = LLM(str(model_dir), dtype=args.dtype, max_batch_size=args.max_batch_size,
              trust_remote_code=args.trust_remote_code, max_seq_len=args.max_context_tokens or None,
              max_num_tokens=args.max_num_tokens, enable_iter_perf_stats=True,
              kv_cache_config=KvCacheConfig(enable_block_reuse=True,
                                            free_gpu_memory_fraction=args.kv_cache_free_gpu_memory_fraction))
    version = getattr(tensorrt_llm, "__version__", "0")
    kind = reward_kind(model_dir)
    if kind is not None:
        return None, scorer_for(llm, SamplingParams, model_dir.name, kind, args)
    engine = TrtLlmEngine(llm, SamplingParams, model_dir.name, model_dir, args.max_batch_size, version)
    scorer = None if args.no_verifier and not args.prm_tokens else scorer_for(
        llm, SamplingParams, model_dir.name, "causal", args)
    return engine, scorer
