"""Reward scoring on TensorRT-LLM, from context logits (`SamplingParams(return_context_logits=True)`,
`RequestOutput.context_logits`: [prompt_len, vocab] for a causal LM, [prompt_len, labels] for a
reward model). Each candidate is one request of max_tokens=1; TensorRT-LLM batches them in flight.

- verifier (the worker's causal LM): the CPU worker's yes/no question (torch_engine.scoring), score =
  P(yes) / (P(yes) + P(no)) at the last prompt position.
- process from a causal-LM PRM (`--prm-tokens GOOD,BAD`, e.g. Math-Shepherd's '+,-'): the candidate's
  steps each end with the separator; a step's score is P(GOOD) / (P(GOOD) + P(BAD)) at the separator's
  last token; score = the minimum over steps.
- a reward model TensorRT-LLM runs itself (architectures *ForProcessRewardModel, e.g. Qwen2.5-Math-PRM:
  two labels per token, P(label 1) at each step end; *ForRewardModel, e.g. Qwen2.5-Math-RM: one
  score at the last token).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from torch_engine.scoring import answer_token_ids, yes_no_token_ids
from trellis_rpc.errors import context_exceeded, failed_precondition, internal, invalid
from trellis_rpc.scoring import process_steps
from worker_runtime.engine_api import CandidateScoreOut, LoadStats, ScoreInput, ScoreOut, ScorerInfo
from worker_runtime.verifier import VERIFY_TEMPLATE, prompt_messages, prompt_text

_SENTINEL = "\x00trellis-assistant-content\x00"
REWARD_ARCHITECTURES = {"ForProcessRewardModel": "process", "ForRewardModel": "outcome"}


def reward_kind(model_dir: Path) -> str | None:
    """'process' / 'outcome' for a reward model TensorRT-LLM runs (by config.json's architectures), else None."""
    try:
        architectures = json.loads((model_dir / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError):
        return None
    for arch in architectures:
        for suffix, kind in REWARD_ARCHITECTURES.items():
            if arch.endswith(suffix):
                return kind
    return None


@dataclass
class _Row:
    ids: list[int]
    reads: list[int]          # positions whose logits give the scores


class TrtScorer:
    """mode: "causal" (verifier, and process when good/bad tokens are given), "process" or "outcome"
    (a reward model's label head)."""

    def __init__(self, llm, sampling_params_cls, model_id: str, mode: str, max_candidates: int = 64,
                 prm_tokens: tuple[str, str] | None = None, verifier: bool = True, owns_llm: bool = False) -> None:
        self.llm = llm
        self.SamplingParams = sampling_params_cls
        self.mode = mode
        self.owns_llm = owns_llm
        self.tokenizer = llm.tokenizer.tokenizer if hasattr(llm.tokenizer, "tokenizer") else llm.tokenizer
        kinds: tuple[str, ...]
        if mode == "causal":
            self.yes_ids, self.no_ids = yes_no_token_ids(self.tokenizer)
            kinds = ("verifier",) if verifier else ()
            if prm_tokens:
                self.good_ids = answer_token_ids(self.tokenizer, prm_tokens[0])
                self.bad_ids = answer_token_ids(self.tokenizer, prm_tokens[1])
                kinds = ("process", *kinds)
        else:
            kinds = (mode,)
        self.info = ScorerInfo(model_id=model_id, kinds=kinds, engine="tensorrt-llm",
                               max_context_tokens=getattr(llm.args, "max_seq_len", None) or 0,
                               max_candidates=max_candidates, eos_token=self.tokenizer.eos_token or "")
        self._queued = 0
        self._running = 0

    # ---- rows ----------------------------------------------------------------------------------

    def _encode(self, text: str, special: bool) -> list[int]:
        return self.tokenizer(text, add_special_tokens=special)["input_ids"]

    def _verifier_rows(self, request: ScoreInput) -> list[_Row]:
        question = prompt_text(request.prompt)
        rows = []
        for candidate in request.candidates:
            text = VERIFY_TEMPLATE.format(question=question, answer=candidate)
            if getattr(self.tokenizer, "chat_template", None):
                ids = self._encode(self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False), False)
            else:
                ids = self._encode(text + "\nAnswer:", True)
            rows.append(_Row(ids, [len(ids) - 1]))
        return rows

    def _frame(self, request: ScoreInput) -> tuple[list[int], list[int]]:
        """Token ids before and after the assistant's content."""
        if not getattr(self.tokenizer, "chat_template", None):
            return self._encode(prompt_text(request.prompt) + "\n", True), []
        rendered = self.tokenizer.apply_chat_template(
            prompt_messages(request.prompt) + [{"role": "assistant", "content": _SENTINEL}], tokenize=False)
        if rendered.count(_SENTINEL) != 1:
            raise failed_precondition("the model's chat template does not render the assistant's content verbatim")
        before, after = rendered.split(_SENTINEL)
        return self._encode(before, False), (self._encode(after, False) if after else [])

    def _candidate_rows(self, request: ScoreInput) -> list[_Row]:
        """Prompt + candidate; reads at every step end (process) or at the last token (outcome)."""
        before, after = self._frame(request)
        rows = []
        for candidate in request.candidates:
            ids, reads = list(before), []
            if request.kind == "process":
                for step in process_steps(candidate, request.step_separator):
                    ids += self._encode(step + request.step_separator, False)
                    reads.append(len(ids) - 1)
            else:
                ids += self._encode(candidate, False)
            ids += after
            rows.append(_Row(ids, reads or [len(ids) - 1]))
        return rows

    # ---- scoring -------------------------------------------------------------------------------

    async def score(self, task_id: str, request: ScoreInput) -> ScoreOut:
        if request.kind not in self.info.kinds:
            raise invalid("kind", f"this worker scores {' and '.join(self.info.kinds)}, not {request.kind}")
        rows = self._verifier_rows(request) if request.kind == "verifier" else self._candidate_rows(request)
        limit = self.info.max_context_tokens
        for i, row in enumerate(rows):
            if limit and len(row.ids) >= limit:
                raise context_exceeded(f"candidates[{i}]", f"{len(row.ids)} tokens (prompt and candidate together) do "
                                                           f"not fit the model's context of {limit} tokens")
        started = time.perf_counter()
        self._running += len(rows)
        try:
            logits = await asyncio.gather(*(self._context_logits(row) for row in rows))
        finally:
            self._running -= len(rows)
        scores = [self._read(request.kind, row, lg) for row, lg in zip(rows, logits, strict=True)]
        return ScoreOut(scores=[CandidateScoreOut(i, min(v) if request.kind == "process" else v[0],
                                                     v if request.kind == "process" else [])
                                   for i, v in enumerate(scores)],
                           prompt_tokens=sum(len(r.ids) for r in rows), queue_ms=0.0,
                           latency_ms=(time.perf_counter() - started) * 1000)

    async def _context_logits(self, row: _Row) -> torch.Tensor:
        params = self.SamplingParams(max_tokens=1, temperature=0.0, return_context_logits=True)
        output = await self.llm.generate_async(row.ids, sampling_params=params)
        if output.context_logits is None:
            raise internal("TensorRT-LLM returned no context logits (is speculative "
                           "decoding on? it does not return them)")
        return output.context_logits

    def _read(self, kind: str, row: _Row, logits: torch.Tensor) -> list[float]:
        at = logits[row.reads].float()
        if self.mode == "causal":
            logp = torch.log_softmax(at, dim=-1)
            good, bad = (self.yes_ids, self.no_ids) if kind == "verifier" else (self.good_ids, self.bad_ids)
            return torch.sigmoid(torch.logsumexp(logp[:, good], -1) - torch.logsumexp(logp[:, bad], -1)).tolist()
        if at.shape[-1] == 1:
            return (at[:, 0] if kind == "outcome" else torch.sigmoid(at[:, 0])).tolist()
        return torch.softmax(at, dim=-1)[:, -1].tolist()

    def load(self) -> LoadStats:
        return LoadStats(queue_depth=self._queued, running_sequences=self._running, kv_blocks_used=0, kv_blocks_free=0)

    def close(self) -> None:
        if self.owns_llm:
            self.llm.shutdown()


def scorer_for(llm, sampling_params_cls, model_id: str, mode: str, args: argparse.Namespace) -> TrtScorer:
    prm = tuple(args.prm_tokens.split(",")) if args.prm_tokens else None
    return TrtScorer(llm, sampling_params_cls, model_id, mode, prm_tokens=prm, verifier=not args.no_verifier,
                     owns_llm=mode != "causal")
