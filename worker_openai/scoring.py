"""Score tasks on an OpenAI-compatible upstream.

SCORE_VERIFIER: the same yes/no question the CPU and GPU workers ask (worker_runtime.verifier), answered from
the `top_logprobs` of the upstream's next token.

score = P(yes) / (P(yes) + P(no)), where P(yes) sums the top-logprob entries that spell "yes" in any case
and spacing. When neither spelling is among the top entries the model leans on neither: 0.5.
"""

from __future__ import annotations

import asyncio
import math
import time

from trellis_rpc.errors import invalid, unavailable
from worker_openai.engine import OpenAIEngine
from worker_openai.prompts import render
from worker_openai.upstream import Upstream
from worker_runtime.engine_api import CandidateScoreOut, LoadStats, PromptInput, ScoreInput, ScoreOut, ScorerInfo
from worker_runtime.verifier import prompt_messages, prompt_text, verify_question


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


class ClassifyScorer:
    """SCORE_OUTCOME from a reward model the upstream serves behind vLLM's classification API (`POST /classify`,
    which SGLang serves as /v1/classify too): each candidate, rendered after the prompt as the assistant's
    answer, is one input; its score is the probability of the last class (a one-label model's sigmoid).
    The CPU worker reports a one-label model's raw logit instead: the same ranking, another scale."""

    def __init__(self, upstream: Upstream, model: str, url: str, tokenizer=None, engine: str = "",
                 max_candidates: int = 64, model_id: str = "") -> None:
        self.upstream = upstream
        self.model = model
        self.url = url
        self.tokenizer = tokenizer
        self.info = ScorerInfo(model_id=model_id or model, kinds=("outcome",), engine=engine, max_context_tokens=0,
                               max_candidates=max_candidates, eos_token=getattr(tokenizer, "eos_token", "") or "")
        self.running = 0

    def inputs(self, request: ScoreInput) -> tuple[list[str], bool]:
        """The texts to classify, and whether they already carry the template's special tokens."""
        if self.tokenizer is not None and getattr(self.tokenizer, "chat_template", None):
            messages = prompt_messages(request.prompt)
            return [self.tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": c}],
                                                       tokenize=False) for c in request.candidates], True
        question = prompt_text(request.prompt)
        return [question + "\n" + c for c in request.candidates], False

    async def score(self, task_id: str, request: ScoreInput) -> ScoreOut:
        if request.kind != "outcome":
            raise invalid("kind", f"this worker serves an outcome reward model, not {request.kind}")
        started = time.monotonic()
        texts, templated = self.inputs(request)
        self.running += len(texts)
        try:
            reply = await self.upstream.post_json(self.url, {"model": self.model, "input": texts,
                                                             "add_special_tokens": not templated})
        finally:
            self.running -= len(texts)
        rows = sorted(reply.get("data") or [], key=lambda d: d.get("index", 0))
        if len(rows) != len(texts):
            raise unavailable(f"the upstream classified {len(rows)} of {len(texts)} candidates")
        scores = [CandidateScoreOut(index=i, score=float(row["probs"][-1])) for i, row in enumerate(rows)]
        return ScoreOut(scores=scores, prompt_tokens=int((reply.get("usage") or {}).get("prompt_tokens") or 0),
                        queue_ms=0.0, latency_ms=(time.monotonic() - started) * 1000.0)

    def load(self) -> LoadStats:
        return LoadStats(queue_depth=0, running_sequences=self.running, kv_blocks_used=0, kv_blocks_free=0)

    def close(self) -> None:
        pass
