"""Mirrors the per-token work of tensorrt_llm/_torch/pyexecutor/sampler.py (TorchSampler) for one row:
logits processing, greedy or seeded sampling, top-K logprobs and the stop criteria.

Order of logits processing: embedding bias, bad words, penalties (repetition over prompt + output;
presence / frequency over prompt[prompt_ignore_length:] + output, as TensorRT-LLM counts them), the
min_tokens mask on end_id, then temperature, min_p (before top_k / top_p, per docs/features/sampling.md),
top_k, top_p. Logprobs follow logprobs_mode: 'raw' = log_softmax of the model's logits (the default),
'processed' = of the processed logits."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from ...bindings.executor import FinishReason
from ...executor.params.sampling import LogprobMode, SamplingParams
from ...executor.result import Logprob


@dataclass
class SampleOutput:
    token: int
    logprob: float                      # the sampled token's logprob (per logprobs_mode)
    top: dict[int, Logprob] | None      # the TokenLogprobs entry when logprobs were requested


def _ban_bad_words(logits: torch.Tensor, bad_words: list[list[int]], tokens: list[int]) -> None:
    for word in bad_words:
        if not word:
            continue
        prefix = word[:-1]
        if not prefix or tokens[-len(prefix):] == prefix:
            logits[word[-1]] = float("-inf")


def _apply_penalties(logits: torch.Tensor, sp: SamplingParams, prompt: list[int], output: list[int]) -> None:
    if sp.repetition_penalty is not None and sp.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt) | set(output)), dtype=torch.long)
        vals = logits[seen]
        logits[seen] = torch.where(vals > 0, vals / sp.repetition_penalty, vals * sp.repetition_penalty)
    if sp.presence_penalty or sp.frequency_penalty:
        counted = prompt[sp.prompt_ignore_length or 0:] + output
        counts = Counter(counted)
        if counts:
            ids = torch.tensor(list(counts), dtype=torch.long)
            freq = torch.tensor([counts[i] for i in counts], dtype=logits.dtype)
            if sp.presence_penalty:
                logits[ids] -= sp.presence_penalty
            if sp.frequency_penalty:
                logits[ids] -= sp.frequency_penalty * freq


def _mask_sampling(logits: torch.Tensor, sp: SamplingParams) -> torch.Tensor:
    """Temperature, then min_p / top_k / top_p as -inf masks."""
    logits = logits / (sp.temperature if sp.temperature is not None else 1.0)
    if sp.min_p is not None and sp.min_p > 0:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < sp.min_p * probs.max(), float("-inf"))
    if sp.top_k is not None and 0 < sp.top_k < logits.numel():
        kth = torch.topk(logits, sp.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sp.top_p is not None and sp.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.cumsum(torch.softmax(sorted_logits, dim=-1), dim=-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) >= sp.top_p   # keep the first token crossing top_p
        drop[0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def token_logprobs(logprobs: torch.Tensor, k: int, token: int) -> dict[int, Logprob]:
    """The TokenLogprobs entry: top-k ids ranked 1..k, plus the sampled token with its rank if missing."""
    entry: dict[int, Logprob] = {}
    if k > 0:
        values, ids = torch.topk(logprobs, k=min(k, logprobs.numel()))
        entry = {int(i): Logprob(logprob=float(v), rank=r + 1) for r, (v, i) in enumerate(zip(values, ids,
                                                                                                strict=True))}
    if token not in entry:
        value = float(logprobs[token])
        entry[token] = Logprob(logprob=value, rank=int((logprobs > value).sum()) + 1)
    return entry


def sample(raw_logits: torch.Tensor, sp: SamplingParams, prompt: list[int], output: list[int],
           generator: torch.Generator) -> SampleOutput:
    """One token for one sequence from the model's last-position logits ([vocab])."""
    raw = raw_logits.float()
    logits = raw.clone()
    if sp.embedding_bias is not None:
        logits += sp.embedding_bias.to(logits.dtype)
    bad_words = sp._get_bad_words()
    if bad_words:
        _ban_bad_words(logits, bad_words, prompt + output)
    _apply_penalties(logits, sp, prompt, output)
    end_id = -1 if sp.ignore_eos else sp.end_id
    if sp.min_tokens and len(output) < sp.min_tokens and end_id is not None and 0 <= end_id < logits.numel():
        logits[end_id] = float("-inf")
    if sp._greedy_decoding:
        processed = logits
        token = int(torch.argmax(processed))
    else:
        processed = _mask_sampling(logits, sp)
        probs = torch.softmax(processed, dim=-1)
        token = int(torch.multinomial(probs, 1, generator=generator))
    source = processed if sp.logprobs_mode == LogprobMode.PROCESSED else raw
    logprobs = torch.log_softmax(source, dim=-1)
    top = token_logprobs(logprobs, sp.logprobs, token) if sp.logprobs is not None else None
    return SampleOutput(token=token, logprob=float(logprobs[token]), top=top)


def stop_reason(token: int, sp: SamplingParams, tokens: list[int], num_generated: int,
                max_seq_len: int) -> FinishReason:
    """TorchSampler._handle_stop_criteria, in its order: END_ID (the token is then dropped from the
    output), LENGTH, STOP_WORDS (matched on the tail of prompt + output). `tokens` already ends with
    `token` unless it is the end id."""
    end_id = -1 if sp.ignore_eos else sp.end_id
    if token == end_id:
        return FinishReason.END_ID
    if num_generated >= sp.max_tokens or len(tokens) >= max_seq_len:
        return FinishReason.LENGTH
    for word in sp._get_stop_words():
        if word and len(word) <= len(tokens) and tokens[-len(word):] == word:
            return FinishReason.STOP_WORDS
    return FinishReason.NOT_FINISHED
