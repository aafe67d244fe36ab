"""SCORE_VERIFIER on an OpenAI-compatible upstream: the same yes/no question the CPU and GPU workers ask
(worker_runtime.verifier), answered from the `top_logprobs` of the upstream's next token.

score = P(yes) / (P(yes) + P(no)), where P(yes) sums the top-logprob entries that spell "yes" in any case
and spacing. When neither spelling is among the top entries the model leans on neither: 0.5.
"""

from __future__ import annotations

import asyncio
import math
import time

from trellis_rpc.errors import invalid
from worker_openai.engine import OpenAIEngine
from worker_openai.prompts import render
from worker_runtime.engine_api import CandidateScoreOut, LoadStats, PromptInput, ScoreInput, ScoreOut, ScorerInfo
from worker_runtime.verifier import verify_question


def yes_probability(top: dict[str, float]) -> float:
    yes = sum(math.exp(v) for t, v in top.items() if t.strip().lower() == "yes")
    no = sum(math.exp(v) for t, v in top.items() if t.strip().lower() == "no")
    return yes / (yes + no) if yes + no > 0 else 0.5


class VerifierScorer:
    def __init__(self, engine: OpenAIEngine, max_candidates: int = 64) -> None:
        self.engine = engine
        self.top = engine.kind.max_logprobs or 0
        if not self.top:
            raise ValueError(f"the upstream ({engine.kind.name}) returns no logprobs: no verifier")
        self.info = ScorerInfo(model_id=engine.info.model_id, kinds=("verifier",), engine=engine.info.engine,
                               max_context_tokens=engine.info.max_context_tokens, max_candidates=max_candidates,
                               eos_token=engine.info.eos_token)
        self.running = 0

    async def score(self, task_id: str, request: ScoreInput) -> ScoreOut:
        if request.kind != "verifier":
            raise invalid("kind", f"this worker verifies; it has no {request.kind} reward model")
        started = time.monotonic()
        self.running += len(request.candidates)
        try:
            results = await asyncio.gather(*(self._verify(request.prompt, c) for c in request.candidates))
        finally:
            self.running -= len(request.candidates)
        return ScoreOut(scores=[CandidateScoreOut(index=i, score=p) for i, (p, _) in enumerate(results)],
                        prompt_tokens=sum(n for _, n in results), queue_ms=0.0,
                        latency_ms=(time.monotonic() - started) * 1000.0)

    async def _verify(self, prompt: PromptInput, candidate: str) -> tuple[float, int]:
        question = render(PromptInput(chat=[{"role": "user", "content": verify_question(prompt, candidate)}]),
                          self.engine.tokenizer)
        body = {"model": self.engine.model, **question.body(), "max_tokens": 1, "temperature": 0.0}
        if question.chat:
            body.update(logprobs=True, top_logprobs=self.top)
            path = "chat/completions"
        else:
            body["logprobs"] = self.top
            path = "completions"
        reply = await self.engine.upstream.post_json(path, body)
        choice = (reply.get("choices") or [{}])[0]
        lp = choice.get("logprobs") or {}
        if question.chat:
            content = lp.get("content") or [{}]
            top = {t["token"]: float(t["logprob"]) for t in content[0].get("top_logprobs") or []}
        else:
            tops = lp.get("top_logprobs") or [{}]
            top = {t: float(v) for t, v in (tops[0] or {}).items()}
        return yes_probability(top), int((reply.get("usage") or {}).get("prompt_tokens") or 0)

    def load(self) -> LoadStats:
        return LoadStats(queue_depth=0, running_sequences=self.running, kv_blocks_used=0, kv_blocks_free=0)

    def close(self) -> None:
        pass
