"""Reward scoring on the CPU worker: outcome and process reward models, and a yes/no verifier.

Every kind scores all candidates of one request together: one right-padded forward pass with an
attention mask (split only when the padded batch would exceed max_batch_tokens). Right padding
keeps each row's real tokens at positions 0..len-1, so a causal model computes them exactly as it
would unpadded, and the positions to read are known without any offset arithmetic.

- OutcomeScorer: a *ForSequenceClassification model (AutoModelForSequenceClassification). The text
  is the chat template over [user: prompt, assistant: candidate] when the tokenizer has one, else
  prompt + "\\n" + candidate. The model pools its own logits (the last non-pad token for decoder
  models); score = the logit when num_labels == 1, else the softmax probability of the last label.
- ProcessScorer: a *ForTokenClassification model (AutoModelForTokenClassification), e.g. a PRM
  trained like Qwen2.5-Math-PRM with the step separator as its step marker. The candidate is split
  at the separator (blank pieces dropped) and rebuilt as step_1 + sep + step_2 + sep + ... + step_n
  + sep, so every step ends with the marker; each piece is tokenized on its own, which makes the
  marker end a token. A step's score is read at the last token of its marker: P(label 1) after a
  softmax (num_labels == 2), or the sigmoid of the single logit (num_labels == 1). score = the
  minimum over the steps.
- VerifierScorer: the worker's own causal LM. Per candidate, the chat template renders the user
  turn "Question: ...\\nProposed answer: ...\\nIs the proposed answer correct? Answer Yes or No."
  with the generation prompt; score = P(yes) / (P(yes) + P(no)) from the next-token distribution,
  where P(yes) sums the probabilities of the single-token spellings "Yes" and " Yes" that the
  vocabulary has (likewise "No" / " No"). A tokenizer with no single-token spelling falls back to
  the first token of each spelling; tokens shared by both sides are dropped.

A scorer runs its model on one thread of its own (or on the thread that calls run(), as the worker
does for a reward-model worker) and hands results back to the event loop, which never waits on torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import structlog
import torch

from torch_engine.model_loader import LoadedModel
from trellis_rpc.errors import StatusError, context_exceeded, failed_precondition, unavailable
from trellis_rpc.scoring import process_steps
from worker_runtime.engine_api import (
    CandidateScoreOut,
    LoadStats,
    PromptInput,
    RunInfo,
    ScoreInput,
    ScoreOut,
    ScorerInfo,
)
from worker_runtime.verifier import VERIFY_TEMPLATE, prompt_messages, prompt_text

log = structlog.get_logger(__name__)

_SENTINEL = "\x00trellis-assistant-content\x00"


@dataclass
class ScoreRow:
    """One candidate as the model sees it: token ids, and the positions whose outputs are read."""

    ids: list[int]
    reads: list[int] = field(default_factory=list)


@dataclass
class _Job:
    task_id: str
    request: ScoreInput
    submitted: float
    settle: Callable[[ScoreOut | None, BaseException | None], None]
    cancelled: bool = False


# ---- helpers shared with the tests ---------------------------------------------------------------

def answer_token_ids(tokenizer, word: str) -> list[int]:
    """Token ids of `word` and " word" that are single tokens; if neither is, the first token of each."""
    spellings = [tokenizer.encode(s, add_special_tokens=False) for s in (word, " " + word)]
    ids = [enc[0] for enc in spellings if len(enc) == 1]
    if not ids:
        ids = [enc[0] for enc in spellings if enc]
    return list(dict.fromkeys(ids))


def yes_no_token_ids(tokenizer) -> tuple[list[int], list[int]]:
    yes, no = answer_token_ids(tokenizer, "Yes"), answer_token_ids(tokenizer, "No")
    shared = set(yes) & set(no)
    yes, no = [t for t in yes if t not in shared], [t for t in no if t not in shared]
    if not yes or not no:
        raise ValueError("the tokenizer has no token that tells 'Yes' from 'No'")
    return yes, no


def context_limit(model, tokenizer) -> int:
    """Longest sequence the model takes (0: no known limit)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    return value if isinstance(value, int) and 0 < value < 10_000_000 else 0


# ---- the scorers ---------------------------------------------------------------------------------

class TorchScorer:
    """Queue, thread and batching shared by the three kinds; subclasses build rows and read outputs."""

    kind: ClassVar[str]

    def __init__(self, loaded: LoadedModel, *, max_candidates: int = 64, max_batch_tokens: int = 16384,
                 threads: int | None = None, start_thread: bool = True, max_context: int = 0) -> None:
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        limit = context_limit(self.model, self.tokenizer)
        self.max_context = min(limit, max_context) if limit and max_context else (limit or max_context)
        self.max_batch_tokens = max_batch_tokens
        self.info = ScorerInfo(model_id=loaded.model_id, kinds=(self.kind,), engine="torch-cpu",
                               max_context_tokens=self.max_context, max_candidates=max_candidates,
                               eos_token=self.tokenizer.eos_token or "")
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.tokenizer.eos_token_id or 0)
        self._threads = threads
        # gate(run): true while the worker's engine serves better-ranked runs than `run` (run_las); a score task
        # then waits, at most starvation_s from its arrival, rather than take the cores from them.
        self.gate: Callable[[RunInfo | None], bool] | None = None
        self.starvation_s = 10.0
        self._inbox: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._running = 0
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        if start_thread:
            self._thread = threading.Thread(target=self.run, name=f"scorer-{self.kind}", daemon=True)
            self._thread.start()

    # ---- asyncio side ----------------------------------------------------------------------

    async def score(self, task_id: str, request: ScoreInput) -> ScoreOut:
        if self._stopped.is_set():
            raise unavailable("the worker is shutting down")
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()

        def settle_on_loop(result: ScoreOut | None, exc: BaseException | None) -> None:
            if future.done():
                return
            if exc is not None:
                future.set_exception(exc)
            else:
                future.set_result(result)

        def settle(result: ScoreOut | None, exc: BaseException | None) -> None:
            try:
                loop.call_soon_threadsafe(settle_on_loop, result, exc)
            except RuntimeError:  # the loop is gone: nobody waits for this result
                pass

        job = _Job(task_id, request, time.perf_counter(), settle)
        self._inbox.put(job)
        try:
            return await future
        finally:
            job.cancelled = not future.done() or future.cancelled()  # a job not started yet is skipped

    def load(self) -> LoadStats:
        return LoadStats(queue_depth=self._inbox.qsize(), running_sequences=self._running,
                         kv_blocks_used=0, kv_blocks_free=0)

    def close(self) -> None:
        """Stop after the current batch (thread-safe); waiting tasks fail with UNAVAILABLE."""
        self._stopped.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    # ---- scoring thread --------------------------------------------------------------------

    def run(self) -> None:
        """The scoring loop; returns after close(). Runs on its own thread unless start_thread=False."""
        if self._threads:
            torch.set_num_threads(self._threads)
        while not self._stopped.is_set():
            try:
                job = self._inbox.get(timeout=0.1)
            except queue.Empty:
                continue
            self._hold(job)
            if job.cancelled:
                continue
            started = time.perf_counter()
            self._running = len(job.request.candidates)
            try:
                scores, tokens = self.score_now(job.request)
                now = time.perf_counter()
                job.settle(ScoreOut(scores=scores, prompt_tokens=tokens, queue_ms=(started - job.submitted) * 1e3,
                                       latency_ms=(now - job.submitted) * 1e3), None)
            except StatusError as err:
                job.settle(None, err)
            except Exception as exc:
                log.exception("scoring failed", task_id=job.task_id)
                job.settle(None, exc)
            finally:
                self._running = 0
        while True:
            try:
                job = self._inbox.get_nowait()
            except queue.Empty:
                break
            job.settle(None, unavailable("the worker is shutting down"))

    def _hold(self, job: _Job) -> None:
        while (self.gate is not None and not job.cancelled and not self._stopped.is_set()
               and time.perf_counter() - job.submitted < self.starvation_s and self.gate(job.request.run)):
            time.sleep(0.005)

    def score_now(self, request: ScoreInput) -> tuple[list[CandidateScoreOut], int]:
        """Score synchronously on the calling thread: (scores in candidate order, tokens run)."""
        rows = self.rows(request)
        for i, row in enumerate(rows):
            if self.max_context and len(row.ids) > self.max_context:
                raise context_exceeded(f"candidates[{i}]", f"{len(row.ids)} tokens (prompt and candidate together) do "
                                                           f"not fit the model's context of {self.max_context} tokens")
        values: list[list[float]] = [[] for _ in rows]
        device = next(self.model.parameters()).device
        # Inputs are built without a device: on CUDA (worker_gpu --engine torch) they must land there.
        with torch.inference_mode(), contextlib.nullcontext() if device.type == "cpu" else device:
            for batch in self._batches(rows):
                for i, v in zip(batch, self._forward([rows[i] for i in batch]), strict=True):
                    values[i] = v
        return [self._result(i, v) for i, v in enumerate(values)], sum(len(r.ids) for r in rows)

    def _batches(self, rows: list[ScoreRow]) -> list[list[int]]:
        """ScoreRow indices grouped, shortest first, so that no padded batch exceeds max_batch_tokens."""
        order = sorted(range(len(rows)), key=lambda i: len(rows[i].ids))
        batches: list[list[int]] = []
        for i in order:
            if batches and self._batchable and (len(batches[-1]) + 1) * len(rows[i].ids) <= self.max_batch_tokens:
                batches[-1].append(i)
            else:
                batches.append([i])
        return batches

    _batchable = True  # False: one candidate per forward

    def _padded(self, rows: list[ScoreRow], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r.ids) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, :len(r.ids)] = torch.tensor(r.ids, dtype=torch.long)
            mask[b, :len(r.ids)] = 1
        return ids, mask

    def _has_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def _encode(self, text: str, special_tokens: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special_tokens)["input_ids"])

    def _result(self, index: int, values: list[float]) -> CandidateScoreOut:
        return CandidateScoreOut(index=index, score=values[0])

    # subclasses
    def rows(self, request: ScoreInput) -> list[ScoreRow]:
        raise NotImplementedError

    def _forward(self, rows: list[ScoreRow]) -> list[list[float]]:
        raise NotImplementedError


class OutcomeScorer(TorchScorer):
    kind = "outcome"

    def __init__(self, loaded: LoadedModel, **kwargs) -> None:
        config = loaded.model.config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        # The model finds each row's last token by the config's pad id; without one it takes the
        # very last position, which is only right unpadded: then candidates run one at a time.
        self.config_pad_id = text_config.pad_token_id
        self.num_labels = config.num_labels
        super().__init__(loaded, **kwargs)
        if self.config_pad_id is None:
            self._batchable = False
            log.warning("reward model config has no pad_token_id: scoring candidates one at a time")

    def rows(self, request: ScoreInput) -> list[ScoreRow]:
        if self._has_template():
            messages = prompt_messages(request.prompt)
            texts = [self.tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": c}],
                                                        tokenize=False) for c in request.candidates]
            return [ScoreRow(self._encode(t, False)) for t in texts]
        question = prompt_text(request.prompt)
        return [ScoreRow(self._encode(question + "\n" + c, True)) for c in request.candidates]

    def _forward(self, rows: list[ScoreRow]) -> list[list[float]]:
        pad = self.config_pad_id if self.config_pad_id is not None else self.pad_id
        ids, mask = self._padded(rows, pad)
        logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()  # [B, labels]
        values = logits[:, 0] if self.num_labels == 1 else torch.softmax(logits, dim=-1)[:, -1]
        return [[float(v)] for v in values]


class ProcessScorer(TorchScorer):
    kind = "process"

    def __init__(self, loaded: LoadedModel, **kwargs) -> None:
        self.num_labels = loaded.model.config.num_labels
        if self.num_labels not in (1, 2):
            raise ValueError(f"a process reward model needs 1 or 2 labels per token, this one has {self.num_labels}")
        super().__init__(loaded, **kwargs)

    def _frame(self, prompt: PromptInput) -> tuple[list[int], list[int]]:
        """Token ids before and after the assistant's content."""
        if not self._has_template():
            return self._encode(prompt_text(prompt) + "\n", True), []
        rendered = self.tokenizer.apply_chat_template(
            prompt_messages(prompt) + [{"role": "assistant", "content": _SENTINEL}], tokenize=False)
        if rendered.count(_SENTINEL) != 1:
            raise failed_precondition("the model's chat template does not render the assistant's content verbatim")
        before, after = rendered.split(_SENTINEL)
        return self._encode(before, False), (self._encode(after, False) if after else [])

    def rows(self, request: ScoreInput) -> list[ScoreRow]:
        before, after = self._frame(request.prompt)
        sep = request.step_separator
        rows = []
        for candidate in request.candidates:
            ids, reads = list(before), []
            for step in process_steps(candidate, sep):
                ids += self._encode(step + sep, False)
                reads.append(len(ids) - 1)
            rows.append(ScoreRow(ids + after, reads))
        return rows

    def _forward(self, rows: list[ScoreRow]) -> list[list[float]]:
        ids, mask = self._padded(rows, self.pad_id)
        logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()  # [B, T, labels]
        out = []
        for b, row in enumerate(rows):
            at = logits[b, row.reads]
            probs = torch.sigmoid(at[:, 0]) if self.num_labels == 1 else torch.softmax(at, dim=-1)[:, 1]
            out.append([float(p) for p in probs])
        return out

    def _result(self, index: int, values: list[float]) -> CandidateScoreOut:
        return CandidateScoreOut(index=index, score=min(values), step_scores=values)


class VerifierScorer(TorchScorer):
    kind = "verifier"

    def __init__(self, loaded: LoadedModel, **kwargs) -> None:
        self.yes_ids, self.no_ids = yes_no_token_ids(loaded.tokenizer)
        # Project only each row's last position onto the vocabulary when the model supports it.
        self._keep_last = "logits_to_keep" in inspect.signature(loaded.model.forward).parameters
        super().__init__(loaded, **kwargs)

    def rows(self, request: ScoreInput) -> list[ScoreRow]:
        question = prompt_text(request.prompt)
        rows = []
        for candidate in request.candidates:
            text = VERIFY_TEMPLATE.format(question=question, answer=candidate)
            if self._has_template():
                rendered = self.tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                              add_generation_prompt=True, tokenize=False)
                ids = self._encode(rendered, False)
            else:
                ids = self._encode(text + "\nAnswer:", True)
            rows.append(ScoreRow(ids, [len(ids) - 1]))
        return rows

    def _forward(self, rows: list[ScoreRow]) -> list[list[float]]:
        ids, mask = self._padded(rows, self.pad_id)
        last = torch.tensor([[r.reads[0]] for r in rows], dtype=torch.long)
        if self._keep_last:
            logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=last).logits
            logits = logits[:, 0]
        else:
            logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            logits = logits[torch.arange(len(rows)), last[:, 0]]
        logp = torch.log_softmax(logits.float(), dim=-1)
        yes = torch.logsumexp(logp[:, self.yes_ids], dim=-1)
        no = torch.logsumexp(logp[:, self.no_ids], dim=-1)
        return [[float(v)] for v in torch.sigmoid(yes - no)]  # = P(yes) / (P(yes) + P(no))


SCORERS: dict[str, type[TorchScorer]] = {"outcome": OutcomeScorer, "process": ProcessScorer, "causal": VerifierScorer}


def scorer_for(loaded: LoadedModel, **kwargs) -> TorchScorer:
    """The scorer a loaded model offers: a reward model its kind, a causal LM the verifier."""
    return SCORERS[loaded.kind](loaded, **kwargs)
