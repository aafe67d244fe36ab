"""Next-token selection for the rows of one request (its n samples), with every SamplingParams field.

Order follows common practice (vLLM, HF): min_tokens masking, repetition penalty over prompt and
output, frequency/presence penalties over output, then greedy or temperature -> top_k -> top_p ->
min_p -> draw. Reported logprobs come from the model's raw distribution, before any of this.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trellis_rpc.sampling import SamplingConfig


@dataclass
class Picked:
    tokens: torch.Tensor          # [rows] chosen ids
    logprobs: torch.Tensor        # [rows] raw logprob of each chosen id
    top_ids: torch.Tensor | None  # [rows, k]
    top_logprobs: torch.Tensor | None


class RowPenaltyState:
    """Token counts per row: output counts for frequency/presence, prompt+output presence for repetition."""

    def __init__(self, prompt_ids: list[int], rows: int, vocab: int) -> None:
        self.output_counts = torch.zeros(rows, vocab, dtype=torch.float32)
        seen = torch.zeros(vocab, dtype=torch.bool)
        if prompt_ids:
            seen[torch.tensor(prompt_ids, dtype=torch.long).clamp_(0, vocab - 1)] = True
        self.seen = seen.unsqueeze(0).repeat(rows, 1)

    def add(self, tokens: torch.Tensor) -> None:
        rows = torch.arange(tokens.shape[0])
        self.output_counts[rows, tokens] += 1
        self.seen[rows, tokens] = True

    def keep_rows(self, keep: torch.Tensor) -> None:
        self.output_counts = self.output_counts[keep]
        self.seen = self.seen[keep]


def pick(logits: torch.Tensor, cfg: SamplingConfig, state: RowPenaltyState, generated: int,
         banned_until_min: list[int], generator: torch.Generator | None) -> Picked:
    """logits: [rows, vocab] float32 for the last position of every live row."""
    raw = torch.log_softmax(logits, dim=-1)
    x = logits.clone()
    if generated < cfg.min_tokens and banned_until_min:
        x[:, banned_until_min] = float("-inf")
    if cfg.repetition_penalty != 1.0:
        p = cfg.repetition_penalty
        penalised = torch.where(x > 0, x / p, x * p)
        x = torch.where(state.seen, penalised, x)
    if cfg.frequency_penalty:
        x -= cfg.frequency_penalty * state.output_counts
    if cfg.presence_penalty:
        x -= cfg.presence_penalty * (state.output_counts > 0).float()

    if cfg.greedy:
        tokens = x.argmax(dim=-1)
    else:
        x = x / cfg.temperature
        if cfg.top_k and cfg.top_k < x.shape[-1]:
            kth = torch.topk(x, cfg.top_k, dim=-1).values[:, -1:]
            x = x.masked_fill(x < kth, float("-inf"))
        if cfg.top_p < 1.0:
            sorted_x, order = torch.sort(x, dim=-1, descending=True)
            probs = torch.softmax(sorted_x, dim=-1)
            # Drop a token when the mass before it already reaches top_p; the first always stays.
            drop = (probs.cumsum(dim=-1) - probs) >= cfg.top_p
            sorted_x = sorted_x.masked_fill(drop, float("-inf"))
            x = torch.full_like(x, float("-inf")).scatter(-1, order, sorted_x)
        probs = torch.softmax(x, dim=-1)
        if cfg.min_p > 0.0:
            floor = cfg.min_p * probs.max(dim=-1, keepdim=True).values
            probs = probs.masked_fill(probs < floor, 0.0)
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)

    chosen = raw.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    top_ids = top_lp = None
    if cfg.logprobs:
        top = torch.topk(raw, cfg.logprobs, dim=-1)
        top_ids, top_lp = top.indices, top.values
    return Picked(tokens=tokens, logprobs=chosen, top_ids=top_ids, top_logprobs=top_lp)
