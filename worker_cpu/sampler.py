"""Next-token selection for a batch of rows, each with its own sampling parameters.

Per row, in the usual order (vLLM, HF): min_tokens masking of stop tokens, repetition penalty over
prompt and output, frequency/presence penalties over output, then greedy, or temperature -> top_k
-> top_p -> min_p -> draw. Draws use the exponential race (argmax p / E, E ~ Exp(1)), so each row
can take its noise from its own seeded generator while the arithmetic stays batched. Reported
logprobs come from the model's raw distribution, before any of this.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trellis_rpc.sampling import SamplingConfig


@dataclass
class Row:
    cfg: SamplingConfig
    generator: torch.Generator | None
    generated: int                    # tokens generated so far
    stop_ids: list[int]               # masked while generated < cfg.min_tokens
    prompt_ids: list[int]             # for the repetition penalty
    output_ids: list[int]             # for all penalties


@dataclass
class Picked:
    tokens: list[int]
    logprobs: list[float]             # raw logprob of each chosen token
    top_ids: list[list[int]]          # per row, cfg.logprobs alternatives (empty when not asked)
    top_logprobs: list[list[float]]


def _penalise(x: torch.Tensor, row: Row) -> None:
    cfg, vocab = row.cfg, x.shape[0]
    if cfg.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(row.prompt_ids) | set(row.output_ids)), dtype=torch.long)
        seen = seen[seen < vocab]
        vals = x[seen]
        x[seen] = torch.where(vals > 0, vals / cfg.repetition_penalty, vals * cfg.repetition_penalty)
    if (cfg.frequency_penalty or cfg.presence_penalty) and row.output_ids:
        counts = torch.bincount(torch.tensor(row.output_ids, dtype=torch.long), minlength=vocab)[:vocab].float()
        x -= cfg.frequency_penalty * counts + cfg.presence_penalty * (counts > 0).float()


def sample(logits: torch.Tensor, rows: list[Row]) -> Picked:
    """logits: [R, vocab] float32, one row per entry of rows."""
    R = logits.shape[0]
    raw = torch.log_softmax(logits, dim=-1)
    x = logits.clone()
    for r, row in enumerate(rows):
        if row.generated < row.cfg.min_tokens and row.stop_ids:
            x[r, row.stop_ids] = float("-inf")
        if row.cfg.repetition_penalty != 1.0 or row.cfg.frequency_penalty or row.cfg.presence_penalty:
            _penalise(x[r], row)
    greedy = [row.cfg.greedy for row in rows]
    tokens = x.argmax(dim=-1)
    if not all(greedy):
        temps = torch.tensor([row.cfg.temperature or 1.0 for row in rows], dtype=torch.float32)
        z = x / temps[:, None]
        top_k = [row.cfg.top_k for row in rows]
        if any(top_k):
            k = torch.tensor(top_k)
            kmax = min(max(top_k), z.shape[-1])
            kth = torch.topk(z, kmax, dim=-1).values.gather(1, (k.clamp(1, kmax) - 1)[:, None])
            z = z.masked_fill((k > 0)[:, None] & (z < kth), float("-inf"))
        top_p = torch.tensor([row.cfg.top_p for row in rows], dtype=torch.float32)
        if bool((top_p < 1.0).any()):
            sorted_z, order = torch.sort(z, dim=-1, descending=True)
            probs = torch.softmax(sorted_z, dim=-1)
            # Drop a token when the mass before it already reaches top_p; the first always stays.
            drop = (probs.cumsum(dim=-1) - probs) >= top_p[:, None]
            z = z.scatter(-1, order, sorted_z.masked_fill(drop, float("-inf")))
        probs = torch.softmax(z, dim=-1)
        min_p = torch.tensor([row.cfg.min_p for row in rows], dtype=torch.float32)
        if bool((min_p > 0).any()):
            probs = probs.masked_fill(probs < min_p[:, None] * probs.max(dim=-1, keepdim=True).values, 0.0)
        noise = torch.empty_like(probs)
        for r, row in enumerate(rows):
            noise[r].exponential_(generator=row.generator)
        drawn = (probs / noise).argmax(dim=-1)
        tokens = torch.where(torch.tensor(greedy), tokens, drawn)
    chosen = raw.gather(-1, tokens[:, None]).squeeze(-1)
    top_ids: list[list[int]] = [[] for _ in range(R)]
    top_lp: list[list[float]] = [[] for _ in range(R)]
    want = [row.cfg.logprobs or 0 for row in rows]
    if any(want):
        top = torch.topk(raw, max(want), dim=-1)
        ids, vals = top.indices.tolist(), top.values.tolist()
        for r, k in enumerate(want):
            top_ids[r], top_lp[r] = ids[r][:k], vals[r][:k]
    return Picked(tokens=tokens.tolist(), logprobs=chosen.tolist(), top_ids=top_ids, top_logprobs=top_lp)
