"""A constant-speed engine behind the real worker service: isolates transport and router costs from
model compute. Emits one token per sample every step_s seconds (0: as fast as the loop allows)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

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
)


class ConstantSpeedEngine:
    def __init__(self, step_s: float = 0.0, model_id: str = "fake") -> None:
        self.step_s = step_s
        self.info = EngineInfo(model_id=model_id, engine="fake-constant-speed", max_context_tokens=1 << 20,
                               max_batch_size=1 << 16)
        self._cancelled: set[str] = set()
        self._running = 0

    async def generate(self, task_id: str, prompt: PromptInput, cfg: SamplingConfig,
                       source: SequenceSource | None = None, keep_ttl_s: float | None = None,
                       run: RunInfo | None = None) -> AsyncIterator[Delta | Finished]:
        start = time.perf_counter()
        self._running += cfg.n
        tokens = [[] for _ in range(cfg.n)]
        reason = "length"
        try:
            for step in range(cfg.max_tokens):
                if task_id in self._cancelled:
                    reason = "cancelled"
                    break
                if self.step_s:
                    await asyncio.sleep(self.step_s)
                elif step % 16 == 0:
                    await asyncio.sleep(0)  # let other tasks on the loop run
                for i in range(cfg.n):
                    tokens[i].append(step)
                    yield Delta(i, "x", [step])
        finally:
            self._running -= cfg.n
            self._cancelled.discard(task_id)
        now = time.perf_counter()
        yield Finished([CompletionOut(i, "x" * len(t), t, reason) for i, t in enumerate(tokens)],
                       prompt_tokens=1, cached_prompt_tokens=0, queue_ms=0.0,
                       ttft_ms=(now - start) * 1000, latency_ms=(now - start) * 1000)

    def cancel(self, task_id: str) -> None:
        self._cancelled.add(task_id)

    def load(self) -> LoadStats:
        return LoadStats(queue_depth=0, running_sequences=self._running, kv_blocks_used=0, kv_blocks_free=0)
