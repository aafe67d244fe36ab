"""The CPU serving engine: continuous batching over a paged KV cache with prefix sharing.

One thread runs the loop (torch releases the GIL, so the asyncio side stays responsive); the worker
process gives it the main thread, where torch's parallel kernels run about 2x faster than on any
other thread on this machine (measured: an OpenMP team started from a second thread is slower):
admit new requests, apply cancellations, schedule a step (token budget, chunked prefill,
preemption), run one forward pass over every scheduled token, sample every sequence that reached
the end of its pending tokens, stream the new tokens, retire finished sequences. Requests join and
leave between steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import structlog
import torch

from torch_engine.block_manager import BlockManager
from torch_engine.detokenizer import CONTEXT_TOKENS, IncrementalDetokenizer
from torch_engine.kept import KeptSequences
from torch_engine.model import KVCache, PagedDecoder, decoder_from_hf
from torch_engine.model.compiled_decode import CompiledDecode, should_compile
from torch_engine.model.quant import choose_quantize, quantize_decoder
from torch_engine.model_loader import LoadedModel
from torch_engine.model_runner import ModelRunner
from torch_engine.sampler import Row, sample
from torch_engine.scheduler import Scheduler
from torch_engine.sequence import Request, Sequence, Status
from trellis_rpc.errors import StatusError, context_exceeded, internal, invalid, resource_exhausted
from trellis_rpc.sampling import SamplingConfig
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
from worker_runtime.stop_strings import StopStringMatcher

log = structlog.get_logger(__name__)


@dataclass
class EngineStats:
    steps: int = 0
    prefill_tokens: int = 0       # prompt (and recomputed) tokens run through the model
    decode_tokens: int = 0
    preemptions: int = 0
    pauses: int = 0             # running sequences run_las left out of a step for better-ranked work


class TorchEngine:
    def __init__(self, loaded: LoadedModel, max_batch_size: int = 64, kv_cache_tokens: int = 65536,
                 threads: int | None = None, max_num_tokens: int = 512, block_size: int = 16,
                 start_thread: bool = True, max_context: int = 0, quantize: str = "auto",
                 compile: str = "auto", scheduling: str = "fcfs") -> None:
        """max_context: tokens per sequence (prompt and generated), below the model's own limit; 0: the model's.
        quantize: the linears' weights, "none" (the model's dtype), "int8" (torch_engine/model/quant.py), or
        "auto": int8 for an already quantized checkpoint (a Q4_1 .gguf), none otherwise.
        compile: the decode step through torch.compile, "on", "off", or "auto": when quantized, where it pays
        (torch_engine/model/compiled_decode.py); compiling happens here, before the engine serves."""
        self.tokenizer = loaded.tokenizer
        model = loaded.model
        self.dtype = next(model.parameters()).dtype
        # The engine runs where the model's weights are (worker_gpu's --engine torch moves them to CUDA):
        # tensors made without a device land there, through a device context on CUDA only, because on
        # the CPU that context would put a Python hook on every torch call.
        self.device = next(model.parameters()).device
        self._on_device = contextlib.nullcontext() if self.device.type == "cpu" else self.device
        self.quantize = quantize = choose_quantize(quantize, loaded.quantized_checkpoint)
        # The loop's thread count, fixed now: compiled kernels are built for one (inductor bakes it into its
        # OpenMP loops and guards on it), so the warm-up compiles with the count the loop will run with.
        self._threads = threads or torch.get_num_threads()
        self.scheduling = scheduling
        with self._on_device:
            self._build(model, max_batch_size, kv_cache_tokens, max_num_tokens, block_size, loaded.model_id,
                        max_context, quantize, compile)
        self._inbox: queue.SimpleQueue[Request] = queue.SimpleQueue()
        self._requests: dict[str, Request] = {}
        self._active: list[Request] = []
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        if start_thread:
            self._thread = threading.Thread(target=self.run, name="engine", daemon=True)
            self._thread.start()

    def _build(self, model, max_batch_size: int, kv_cache_tokens: int, max_num_tokens: int, block_size: int,
               model_id: str, max_context: int, quantize: str, compile: str) -> None:
        weights = quantize_decoder(decoder_from_hf(model, self.dtype), quantize)
        self.decoder = PagedDecoder(weights, self.dtype)
        spec = self.decoder.spec
        self.max_context = min(spec.max_positions, max_context or spec.max_positions)
        self.vocab = spec.vocab
        self.max_batch_size = max_batch_size
        self.eos_ids = self._eos_ids(model)
        num_blocks = max(1, kv_cache_tokens // block_size)
        self.blocks = BlockManager(num_blocks, block_size)
        # One block beyond the block manager's: scratch slots for the compiled step's padding row.
        self.kv = KVCache(spec.num_layers, num_blocks + 1, block_size, spec.num_kv_heads, spec.head_dim, self.dtype)
        if should_compile(compile, quantize):
            self.decoder.compiled = CompiledDecode(weights, self.dtype, scratch_slot=num_blocks * block_size)
            caller_threads = torch.get_num_threads()
            torch.set_num_threads(self._threads)
            try:
                self.decoder.compiled.warm_up(self.kv, max_batch_size)
            except Exception as exc:
                if compile == "on":
                    raise
                # auto: a worker that cannot compile (no working toolchain, an unsupported model) still serves.
                log.warning("compiling the decode step failed: it runs eagerly", error=repr(exc)[:500])
                self.decoder.compiled = None
            finally:
                torch.set_num_threads(caller_threads)
        self.runner = ModelRunner(self.decoder, self.kv)
        self.kept = KeptSequences(self.blocks)
        # scheduling: the order waiting tasks start in, "fcfs" (arrival) or "run_las" (by run: priority, least
        # attained service); torch_engine/scheduler.py
        self.scheduler = Scheduler(self.blocks, max_num_tokens, max_batch_size, reclaim=self.kept.evict_oldest,
                                   policy=self.scheduling)
        self.stats = EngineStats()
        self.info = EngineInfo(
            model_id=model_id, engine=f"torch-{self.device.type}", max_context_tokens=self.max_context,
            max_batch_size=max_batch_size, kv_block_size=block_size, kv_blocks_total=num_blocks,
            eos_token=self.tokenizer.eos_token or "", keeps_sequences=True, scheduling=self.scheduling,
        )

    @property
    def compiled(self) -> bool:
        """Whether decode steps run through the compiled graph (compiled_decode.py)."""
        return self.decoder.compiled is not None

    @staticmethod
    def kv_bytes_per_token(model) -> int:
        spec = decoder_from_hf(model, next(model.parameters()).dtype).spec
        return KVCache.bytes_per_token(spec.num_layers, spec.num_kv_heads, spec.head_dim,
                                       next(model.parameters()).dtype)

    def _eos_ids(self, model) -> set[int]:
        ids: set[int] = set()
        for source in (getattr(model, "generation_config", None), model.config, self.tokenizer):
            value = getattr(source, "eos_token_id", None)
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(int(v) for v in value)
        return ids

    # ---- asyncio side ----------------------------------------------------------------------

    def tokenize(self, prompt: PromptInput) -> list[int]:
        return encode_prompt(self.tokenizer, prompt, self.vocab)

    def _appended(self, prompt: PromptInput) -> list[int]:
        """Tokens to add to a kept sequence: raw text (no special tokens) or token ids."""
        if prompt.chat is not None:
            raise invalid("prompt.chat", "a continuation or fork appends text or token_ids, not a chat")
        if prompt.text is not None:
            return self.tokenizer(prompt.text, add_special_tokens=False)["input_ids"] if prompt.text else []
        return self.tokenize(prompt) if prompt.token_ids else []

    async def generate(self, task_id: str, prompt: PromptInput, cfg: SamplingConfig,
                       source: SequenceSource | None = None, keep_ttl_s: float | None = None,
                       run: RunInfo | None = None) -> AsyncIterator[Delta | Finished]:
        ids = self._appended(prompt) if source else self.tokenize(prompt)
        if source is None and len(ids) >= self.max_context:
            raise context_exceeded("prompt", f"{len(ids)} tokens do not fit the model's context of "
                                             f"{self.max_context} tokens (at least one token must be left to generate)")
        # The sampler indexes the logits with stop ids: one out of range would fail the whole engine step.
        check_token_ids(cfg.stop_token_ids, self.vocab, "sampling.stop_token_ids")
        if cfg.n > self.max_batch_size:
            raise invalid("sampling.n", f"must be <= the worker's max batch size {self.max_batch_size}, got {cfg.n}")
        if self.blocks.blocks_for(len(ids) + 1) > self.blocks.num_blocks:
            raise resource_exhausted(f"prompt: {len(ids)} tokens need more KV blocks than this worker has "
                                     f"({self.blocks.num_blocks} of {self.blocks.block_size} tokens)", "prompt")
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        def emit(event: object) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:
                pass  # the caller's event loop is closed: nobody is listening any more

        request = Request(task_id=task_id, prompt_ids=ids, cfg=cfg, submitted=time.perf_counter(), emit=emit,
                          source=source, appended=ids if source else [], keep_ttl_s=keep_ttl_s, run=run)
        self._requests[task_id] = request
        self._inbox.put(request)
        done = False
        try:
            while not done:
                event = await events.get()
                if isinstance(event, BaseException):
                    raise event
                done = isinstance(event, Finished)
                yield event
        finally:
            if not done:
                request.cancelled = True

    def cancel(self, task_id: str) -> None:
        request = self._requests.get(task_id)
        if request is not None:
            request.cancelled = True

    def release(self, task_prefix: str) -> None:
        """Drop the sequences kept by tasks under task_prefix at the next step (the engine thread owns them)."""
        self.kept.release(task_prefix)

    def load(self) -> LoadStats:
        return LoadStats(
            queue_depth=len(self.scheduler.waiting) + self._inbox.qsize(),
            running_sequences=len(self.scheduler.running),
            kv_blocks_used=self.blocks.num_used, kv_blocks_free=self.blocks.num_free,
            kept_sequences=self.kept.holding_blocks(), waiting_runs=self.scheduler.waiting_runs(),
            paused_sequences=self.scheduler.paused,
        )

    def close(self) -> None:
        """Stop the loop after its current step (thread-safe)."""
        self._stopped.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    # ---- engine thread ---------------------------------------------------------------------

    def run(self) -> None:
        """The engine loop; returns after close(). Started on its own thread unless start_thread=False."""
        torch.set_num_threads(self._threads)
        with torch.inference_mode(), self._on_device:
            while not self._stopped.is_set():
                self._admit(block=not self.scheduler.running and not self.scheduler.waiting)
                self._reap_cancelled()
                self.kept.tidy()
                try:
                    self._step()
                except Exception as exc:  # a bug must fail the requests in flight, not hang them
                    log.exception("engine step failed")
                    for request in list(self._active):
                        self._fail(request, internal(f"engine step failed: {exc!r}"))

    def _admit(self, block: bool) -> None:
        try:
            request = self._inbox.get(timeout=0.1) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._active.append(request)
            seq = Sequence(request=request, index=0, token_ids=list(request.prompt_ids),
                           num_prompt=len(request.prompt_ids), detok=IncrementalDetokenizer(self.tokenizer),
                           stops=StopStringMatcher(request.cfg.stop), generator=request.generator(0))
            request.sequences.append(seq)
            if request.source is None or self._attach_source(request, seq):
                self.scheduler.add(seq)
            try:
                request = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _attach_source(self, request: Request, seq: Sequence) -> bool:
        """Start seq from a kept sequence: its tokens, and its KV blocks while they are still held."""
        source = request.source
        try:
            kept = self.kept.get(source.handle)
        except StatusError as err:
            self._fail(request, err)
            return False
        tokens = kept.token_ids + request.appended
        if len(tokens) >= self.max_context:
            self._fail(request, context_exceeded(
                "prompt", f"the kept sequence plus the appended tokens ({len(tokens)}) do not fit the model's context "
                          f"of {self.max_context} tokens"))
            return False
        if kept.table.blocks:
            seq.table = self.blocks.fork(kept.table) if source.fork else kept.table
            # The model must run at least the last token to produce logits.
            seq.computed = min(kept.computed, len(tokens) - 1)
            self.blocks.rewind(seq.table, seq.computed)
        if not source.fork:
            self.kept.use_up(source.handle)
        seq.token_ids = tokens
        request.context = tokens[-CONTEXT_TOKENS:]
        seq.detok = IncrementalDetokenizer(self.tokenizer, request.context)
        seq.num_prompt = len(tokens)
        request.prompt_ids = tokens
        request.cached_prompt_tokens = seq.computed
        return True

    def _keep(self, seq: Sequence) -> None:
        """Hold a finished sequence's blocks under a handle instead of freeing them."""
        request = seq.request
        tokens = seq.token_ids
        if seq.finish_reason == "stop" and not seq.stops.matched:
            tokens = tokens[:-1]  # the end-of-sequence token is not part of what a continuation extends
        handle = f"{request.task_id}/{seq.index}"
        self.kept.keep(handle, tokens, seq.table, min(seq.computed, len(tokens)), request.keep_ttl_s)
        request.handles[seq.index] = handle

    def _reap_cancelled(self) -> None:
        for request in list(self._active):
            if request.cancelled:
                for seq in request.sequences:
                    if seq.status is not Status.FINISHED:
                        self.scheduler.finish(seq)
                self._complete(request)

    def _step(self) -> None:
        plan = self.scheduler.schedule()
        self.stats.preemptions += plan.preempted
        self.stats.pauses += plan.paused
        for seq in plan.exhausted:
            seq.finish_reason = "length"
            self.scheduler.finish(seq)
            seq.request.emit(Delta(seq.index, self._release_text(seq), [], finish_reason="length"))
            self._maybe_complete(seq.request)
        if not plan.items:
            return
        now = time.perf_counter()
        for item in plan.items:
            if not item.seq.request.started:
                item.seq.request.started = now
            if item.tokens > 1 or item.seq.computed < item.seq.num_prompt:
                self.stats.prefill_tokens += item.tokens
            else:
                self.stats.decode_tokens += item.tokens
        logits, sampled = self.runner.run(plan)
        self.stats.steps += 1
        batch, step = len(plan.items), self.stats.steps
        for item in plan.items:
            seq = item.seq
            seq.computed += item.tokens
            self.scheduler.account(seq, item.tokens)
            self.blocks.seal(seq.table, seq.token_ids, seq.computed)
            request = seq.request
            if not request.first_token:
                request.prefill_batch_size = batch
            elif request.last_step != step:  # once per step, however many of its n sequences ran
                request.last_step = step
                request.decode_steps += 1
                request.decode_batch_sum += batch
        if not sampled:
            return
        seqs: list[Sequence] = []
        row_of: list[int] = []
        for r, item in enumerate(sampled):
            for seq in self._fork_if_first(item.seq):
                seqs.append(seq)
                row_of.append(r)
        picked = sample(logits[torch.tensor(row_of)], [self._row(seq) for seq in seqs])
        for i, seq in enumerate(seqs):
            self._accept(seq, picked.tokens[i], picked.logprobs[i], picked.top_ids[i], picked.top_logprobs[i])

    def _fork_if_first(self, seq: Sequence) -> list[Sequence]:
        """At a request's first sampled token, its prefilled sequence becomes n sharing the prompt's blocks."""
        request = seq.request
        if request.forked:
            return [seq]
        request.forked = True
        family = [seq]
        for index in range(1, request.cfg.n):
            child = Sequence(request=request, index=index, token_ids=list(seq.token_ids), num_prompt=seq.num_prompt,
                             detok=IncrementalDetokenizer(self.tokenizer, request.context),
                             stops=StopStringMatcher(request.cfg.stop),
                             generator=request.generator(index), status=Status.RUNNING, computed=seq.computed,
                             table=self.blocks.fork(seq.table))
            request.sequences.append(child)
            self.scheduler.running.append(child)
            family.append(child)
        return family

    def _stop_ids(self, cfg: SamplingConfig) -> set[int]:
        return set(cfg.stop_token_ids) | (set() if cfg.ignore_eos else self.eos_ids)

    def _row(self, seq: Sequence) -> Row:
        cfg = seq.request.cfg
        return Row(cfg=cfg, generator=seq.generator, generated=seq.generated, stop_ids=sorted(self._stop_ids(cfg)),
                   prompt_ids=seq.token_ids[:seq.num_prompt], output_ids=seq.token_ids[seq.num_prompt:])

    def _release_text(self, seq: Sequence) -> str:
        """At the end of a sequence: what was held back (a partial character, a possible stop string)."""
        if seq.stops.matched:
            return ""
        return seq.stops.feed(seq.detok.flush()) + seq.stops.flush()

    def _accept(self, seq: Sequence, token: int, logprob: float, top_ids: list[int], top_lp: list[float]) -> None:
        request, cfg = seq.request, seq.request.cfg
        if not request.first_token:
            request.first_token = time.perf_counter()
        seq.token_ids.append(token)
        seq.cumulative_logprob += logprob
        lp = []
        if cfg.logprobs is not None:
            top = [TopLogprob(t, v, self.tokenizer.decode([t])) for t, v in zip(top_ids, top_lp, strict=True)]
            lp = [TokenLogprob(token, logprob, top)]
            seq.logprobs.extend(lp)
        text = ""
        if token in self._stop_ids(cfg):
            seq.finish_reason = "stop"
        else:
            text = seq.stops.feed(seq.detok.push(token))
            if seq.stops.matched:
                seq.finish_reason = "stop"
            elif seq.generated >= cfg.max_tokens or len(seq.token_ids) >= self.max_context:
                seq.finish_reason = "length"
        if seq.finish_reason:
            text += self._release_text(seq)
        request.emit(Delta(seq.index, text, [token], lp, seq.finish_reason or ""))
        if seq.finish_reason:
            keep = bool(request.keep_ttl_s)
            self.scheduler.finish(seq, keep_blocks=keep)
            if keep:
                self._keep(seq)
            self._maybe_complete(request)

    def _maybe_complete(self, request: Request) -> None:
        if request.forked and all(s.status is Status.FINISHED for s in request.sequences):
            self._complete(request)

    def _complete(self, request: Request) -> None:
        if request.done:
            return
        request.done = True
        now = time.perf_counter()
        by_index = {s.index: s for s in request.sequences}
        completions = []
        for index in range(request.cfg.n):
            seq = by_index.get(index)
            if seq is None:
                completions.append(CompletionOut(index, "", [], "cancelled"))
            else:
                completions.append(CompletionOut(
                    index=index, text=seq.stops.text, token_ids=seq.token_ids[seq.num_prompt:],
                    finish_reason=seq.finish_reason or "cancelled", stop_reason=seq.stops.matched,
                    logprobs=seq.logprobs, cumulative_logprob=seq.cumulative_logprob))
        started = request.started or now
        request.emit(Finished(
            completions=completions, prompt_tokens=len(request.prompt_ids),
            cached_prompt_tokens=request.cached_prompt_tokens,
            queue_ms=(started - request.submitted) * 1000,
            ttft_ms=((request.first_token or now) - request.submitted) * 1000,
            latency_ms=(now - request.submitted) * 1000,
            handles=[request.handles.get(i, "") for i in range(request.cfg.n)] if request.keep_ttl_s else [],
            prefill_batch_size=request.prefill_batch_size, decode_steps=request.decode_steps,
            decode_batch_mean=request.decode_batch_sum / request.decode_steps if request.decode_steps else 0.0,
        ))
        self._retire(request)

    def _fail(self, request: Request, error: StatusError) -> None:
        for seq in request.sequences:
            if seq.status is not Status.FINISHED:
                self.scheduler.finish(seq)
        request.done = True
        request.emit(error)
        self._retire(request)

    def _retire(self, request: Request) -> None:
        if request in self._active:
            self._active.remove(request)
        self._requests.pop(request.task_id, None)
