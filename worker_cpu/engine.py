"""A real, deliberately simple engine: Hugging Face forward passes with a DynamicCache per request.

Scheduling is per step: every running request advances by one token per loop turn, new requests
join between steps, finished or cancelled ones leave at once. The n samples of one request share
one prefill and decode as one batch. Continuous batching across requests with a paged KV cache
replaces this in the engine issue; the interface (trellis_rpc.engine_api.Engine) stays.
"""

from __future__ import annotations

import asyncio
import collections
import math
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc
import structlog
import torch

from trellis_rpc.engine_api import (
    CompletionOut,
    Delta,
    EngineInfo,
    Finished,
    LoadStats,
    PromptInput,
    TokenLogprob,
    TopLogprob,
)
from trellis_rpc.errors import StatusError, invalid
from trellis_rpc.sampling import SamplingConfig
from worker_cpu.detokenizer import IncrementalDetokenizer
from worker_cpu.model_loader import LoadedModel
from worker_cpu.sampler import RowPenaltyState, pick
from worker_cpu.stop_strings import StopStringMatcher

log = structlog.get_logger(__name__)

KV_ACCOUNTING_BLOCK = 16  # tokens; the load report counts KV in blocks of this size


@dataclass
class Sample:
    index: int
    detok: IncrementalDetokenizer
    stops: StopStringMatcher
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    finish_reason: str = ""

    def completion(self) -> CompletionOut:
        return CompletionOut(index=self.index, text=self.stops.text, token_ids=self.token_ids,
                             finish_reason=self.finish_reason or "cancelled", stop_reason=self.stops.matched,
                             logprobs=self.logprobs, cumulative_logprob=self.cumulative_logprob)


@dataclass
class Group:
    """One generate request: its n samples decode together over one shared prefill."""

    task_id: str
    prompt_ids: list[int]
    cfg: SamplingConfig
    emit: Callable[[object], None]
    samples: list[Sample]
    submitted: float
    generator: torch.Generator | None
    started: float = 0.0
    first_token: float = 0.0
    cancelled: bool = False
    alive: list[int] = field(default_factory=list)   # sample index of each cache row
    cache: object = None
    next_logits: torch.Tensor | None = None
    penalty: RowPenaltyState | None = None
    steps: int = 0


class TorchEngine:
    def __init__(self, loaded: LoadedModel, max_batch_size: int = 64, kv_cache_tokens: int = 65536,
                 threads: int | None = None) -> None:
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.max_batch_size = max_batch_size
        config = self.model.config
        self.max_context = int(getattr(config, "max_position_embeddings", 0) or getattr(config, "n_positions", 2048))
        self.vocab = int(config.vocab_size)
        self.eos_ids = self._eos_ids()
        self.kv_blocks_total = kv_cache_tokens // KV_ACCOUNTING_BLOCK
        self.info = EngineInfo(
            model_id=loaded.model_id, engine="torch-cpu", max_context_tokens=self.max_context,
            max_batch_size=max_batch_size, kv_block_size=KV_ACCOUNTING_BLOCK, kv_blocks_total=self.kv_blocks_total,
            eos_token=self.tokenizer.eos_token or "",
        )
        self._threads = threads
        self._inbox: queue.SimpleQueue[Group] = queue.SimpleQueue()
        self._groups: dict[str, Group] = {}
        self._waiting: collections.deque[Group] = collections.deque()
        self._running: list[Group] = []
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (getattr(self.model, "generation_config", None), self.model.config, self.tokenizer):
            value = getattr(source, "eos_token_id", None)
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(int(v) for v in value)
        return ids

    # ---- asyncio side ----------------------------------------------------------------------

    def tokenize(self, prompt: PromptInput) -> list[int]:
        if prompt.token_ids is not None:
            bad = [t for t in prompt.token_ids if t >= self.vocab]
            if bad:
                raise invalid("prompt.token_ids.ids",
                              f"token id {bad[0]} is outside the vocabulary (size {self.vocab})")
            return list(prompt.token_ids)
        if prompt.chat is not None:
            if not getattr(self.tokenizer, "chat_template", None):
                raise invalid("prompt.chat", "this model has no chat template; send prompt.text instead")
            text = self.tokenizer.apply_chat_template(
                prompt.chat, tokenize=False, add_generation_prompt=not prompt.continue_final_message,
                continue_final_message=prompt.continue_final_message)
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.tokenizer(prompt.text)["input_ids"]

    async def generate(self, task_id: str, prompt: PromptInput, cfg: SamplingConfig) -> AsyncIterator[Delta | Finished]:
        ids = self.tokenize(prompt)
        if len(ids) >= self.max_context:
            raise invalid("prompt", f"{len(ids)} tokens do not fit the model's context of {self.max_context} tokens "
                                    f"(at least one token must be left to generate)")
        if cfg.n > self.max_batch_size:
            raise invalid("sampling.n", f"must be <= the worker's max batch size {self.max_batch_size}, got {cfg.n}")
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        group = Group(
            task_id=task_id, prompt_ids=ids, cfg=cfg,
            emit=lambda event: loop.call_soon_threadsafe(events.put_nowait, event),
            samples=[Sample(i, IncrementalDetokenizer(self.tokenizer), StopStringMatcher(cfg.stop))
                     for i in range(cfg.n)],
            submitted=time.perf_counter(),
            generator=torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None,
        )
        self._groups[task_id] = group
        self._inbox.put(group)
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
                group.cancelled = True

    def cancel(self, task_id: str) -> None:
        group = self._groups.get(task_id)
        if group is not None:
            group.cancelled = True

    def load(self) -> LoadStats:
        running = list(self._running)
        kv_tokens = sum(len(g.alive) * (len(g.prompt_ids) + g.steps) for g in running)
        used = math.ceil(kv_tokens / KV_ACCOUNTING_BLOCK)
        return LoadStats(
            queue_depth=len(self._waiting) + self._inbox.qsize(),
            running_sequences=sum(len(g.alive) for g in running),
            kv_blocks_used=used, kv_blocks_free=max(0, self.kv_blocks_total - used),
        )

    def close(self) -> None:
        self._stopped.set()

    # ---- engine thread ---------------------------------------------------------------------

    def _loop(self) -> None:
        if self._threads:
            torch.set_num_threads(self._threads)
        with torch.inference_mode():
            while not self._stopped.is_set():
                self._admit()
                if not self._running:
                    try:
                        self._waiting.append(self._inbox.get(timeout=0.1))
                    except queue.Empty:
                        pass
                    continue
                for group in list(self._running):
                    try:
                        finished = self._step(group)
                    except Exception as exc:  # one request's failure must not take the engine down
                        log.exception("engine step failed", task_id=group.task_id)
                        group.emit(StatusError(grpc.StatusCode.INTERNAL, f"engine step failed: {exc!r}"))
                        finished = True
                    if finished:
                        self._running.remove(group)
                        self._groups.pop(group.task_id, None)

    def _admit(self) -> None:
        while True:
            try:
                self._waiting.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        rows = sum(len(g.alive) for g in self._running)
        while self._waiting:
            group = self._waiting[0]
            if group.cancelled:
                self._waiting.popleft()
                self._finish(group)
                self._groups.pop(group.task_id, None)
                continue
            if self._running and rows + group.cfg.n > self.max_batch_size:
                break
            self._waiting.popleft()
            try:
                self._prefill(group)
            except Exception as exc:
                log.exception("prefill failed", task_id=group.task_id)
                group.emit(StatusError(grpc.StatusCode.INTERNAL, f"prefill failed: {exc!r}"))
                self._groups.pop(group.task_id, None)
                continue
            self._running.append(group)
            rows += group.cfg.n

    def _forward(self, input_ids: torch.Tensor, cache) -> torch.Tensor:
        out = self.model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :].float()

    def _prefill(self, group: Group) -> None:
        from transformers import DynamicCache

        group.started = time.perf_counter()
        cache = DynamicCache(config=self.model.config)
        logits = self._forward(torch.tensor([group.prompt_ids], dtype=torch.long), cache)
        n = group.cfg.n
        if n > 1:
            cache.batch_repeat_interleave(n)
        group.cache = cache
        group.next_logits = logits.expand(n, -1).contiguous()
        group.alive = list(range(n))
        group.penalty = RowPenaltyState(group.prompt_ids, n, logits.shape[-1])

    def _step(self, group: Group) -> bool:
        """Sample one token for every live row of the group, stream it, then run the next forward."""
        if group.cancelled:
            self._finish(group)
            return True
        cfg = group.cfg
        stopping = set(cfg.stop_token_ids) | (set() if cfg.ignore_eos else self.eos_ids)
        picked = pick(group.next_logits, cfg, group.penalty, group.steps, sorted(stopping), group.generator)
        group.steps += 1
        if not group.first_token:
            group.first_token = time.perf_counter()
        group.penalty.add(picked.tokens)
        tokens = picked.tokens.tolist()
        chosen_lp = picked.logprobs.tolist()
        top_ids = picked.top_ids.tolist() if picked.top_ids is not None else None
        top_lp = picked.top_logprobs.tolist() if picked.top_logprobs is not None else None
        keep: list[int] = []
        for row, index in enumerate(group.alive):
            sample = group.samples[index]
            token = tokens[row]
            sample.token_ids.append(token)
            sample.cumulative_logprob += chosen_lp[row]
            lp = []
            if cfg.logprobs is not None:
                top = [] if top_ids is None else [
                    TopLogprob(t, v, self.tokenizer.decode([t]))
                    for t, v in zip(top_ids[row], top_lp[row], strict=True)]
                lp = [TokenLogprob(token, chosen_lp[row], top)]
                sample.logprobs.extend(lp)
            text = ""
            if token in stopping:
                sample.finish_reason = "stop"
            else:
                text = sample.stops.feed(sample.detok.push(token))
                if sample.stops.matched:
                    sample.finish_reason = "stop"
                elif (len(sample.token_ids) >= cfg.max_tokens
                      or len(group.prompt_ids) + len(sample.token_ids) >= self.max_context):
                    sample.finish_reason = "length"
            if sample.finish_reason and not sample.stops.matched:
                # Release what was held back: a partial character, or text that might have become a stop.
                text += sample.stops.feed(sample.detok.flush())
                text += sample.stops.flush()
            group.emit(Delta(index, text, [token], lp))
            if not sample.finish_reason:
                keep.append(row)
        if not keep:
            self._finish(group)
            return True
        if len(keep) < len(group.alive):
            index = torch.tensor(keep, dtype=torch.long)
            group.cache.batch_select_indices(index)
            group.penalty.keep_rows(index)
            picked_tokens = picked.tokens[index]
        else:
            picked_tokens = picked.tokens
        group.alive = [group.alive[r] for r in keep]
        group.next_logits = self._forward(picked_tokens.unsqueeze(-1), group.cache)
        return False

    def _finish(self, group: Group) -> None:
        now = time.perf_counter()
        started = group.started or now
        group.emit(Finished(
            completions=[s.completion() for s in group.samples],
            prompt_tokens=len(group.prompt_ids), cached_prompt_tokens=0,
            queue_ms=(started - group.submitted) * 1000,
            ttft_ms=((group.first_token or now) - group.submitted) * 1000,
            latency_ms=(now - group.submitted) * 1000,
        ))
        group.alive = []
        group.cache = None
        group.next_logits = None
