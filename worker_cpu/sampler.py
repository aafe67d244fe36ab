"""Next-token selection for a batch of rows, each with its own sampling parameters.

Per row, in the usual order (vLLM, HF): min_tokens masking of stop tokens, repetition penalty over
prompt and output, frequency/presence penalties over output, then greedy, or temperature -> top_k
-> top_p -> min_p -> draw (inverse CDF, one uniform number per row from the row's own generator when
seeded). Reported logprobs come from the model's raw distribution, before any of this.
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


# top_p looks for its cut-off among this many best tokens first; a full sort of a 49k vocabulary
# costs ~50x more and is only needed when these do not reach the requested mass.
_TOP_P_WINDOW = 256


def _top_p_mask(z: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Nucleus sampling on rows of z (tempered, top_k-masked): keep a token while the mass of the
    better tokens is below top_p; the first token always stays. Rows with top_p >= 1 are untouched."""
    total = torch.logsumexp(z, dim=-1, keepdim=True)
    k = min(_TOP_P_WINDOW, z.shape[-1])
    vals = torch.topk(z, k, dim=-1).values
    probs = torch.exp(vals - total)
    before = probs.cumsum(-1) - probs
    kept = (before < top_p[:, None]).sum(-1).clamp(min=1)
    threshold = vals.gather(1, (kept - 1)[:, None]).squeeze(1)
    short = ((before[:, -1] + probs[:, -1]) < top_p) & (top_p < 1.0)
    for r in torch.nonzero(short).flatten().tolist():  # the window did not reach top_p: sort the row
        row_vals = torch.sort(z[r], descending=True).values
        row_probs = torch.exp(row_vals - total[r])
        row_kept = int(((row_probs.cumsum(-1) - row_probs) < top_p[r]).sum().clamp(min=1))
        threshold[r] = row_vals[row_kept - 1]
    threshold = torch.where(top_p < 1.0, threshold, torch.full_like(threshold, float("-inf")))
    return z < threshold[:, None]


def _draw(z: torch.Tensor, rows: list[Row]) -> torch.Tensor:
    """One token per row from softmax(z) by inverse CDF: a single uniform number per row (a seeded row
    takes it from its own generator, so batch company cannot change its draw). Noise per vocabulary
    entry (Gumbel, exponential race) costs ~10x more here: elementwise passes over [rows, vocab]."""
    cdf = torch.softmax(z, dim=-1).double().cumsum_(dim=-1)
    u = torch.rand(len(rows), dtype=torch.float64)
    for r, row in enumerate(rows):
        if row.generator is not None:
            u[r] = torch.rand(1, dtype=torch.float64, generator=row.generator)
    picked = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1)).squeeze(-1)
    return picked.clamp_(max=z.shape[-1] - 1)


def sample(logits: torch.Tensor, rows: list[Row]) -> Picked:
    """logits: [R, vocab] float32, one row per entry of rows."""
    R = logits.shape[0]
    x = logits
    edited = [r for r, row in enumerate(rows)
              if (row.generated < row.cfg.min_tokens and row.stop_ids) or row.cfg.repetition_penalty != 1.0
              or row.cfg.frequency_penalty or row.cfg.presence_penalty]
    if edited:
        x = logits.clone()
        for r in edited:
            row = rows[r]
            if row.generated < row.cfg.min_tokens and row.stop_ids:
                x[r, row.stop_ids] = float("-inf")
            _penalise(x[r], row)
    tokens = x.argmax(dim=-1)
    drawn_rows = [r for r, row in enumerate(rows) if not row.cfg.greedy]
    if drawn_rows:
        sub = [rows[r] for r in drawn_rows]
        index = torch.tensor(drawn_rows)
        temps = torch.tensor([row.cfg.temperature for row in sub], dtype=torch.float32)
        z = x[index] / temps[:, None]
        top_k = [row.cfg.top_k for row in sub]
        if any(top_k):
            k = torch.tensor(top_k)
            kmax = min(max(top_k), z.shape[-1])
            kth = torch.topk(z, kmax, dim=-1).values.gather(1, (k.clamp(1, kmax) - 1)[:, None])
            z = z.masked_fill((k > 0)[:, None] & (z < kth), float("-inf"))
        top_p = torch.tensor([row.cfg.top_p for row in sub], dtype=torch.float32)
        if bool((top_p < 1.0).any()):
            z = z.masked_fill(_top_p_mask(z, top_p), float("-inf"))
        min_p = torch.tensor([row.cfg.min_p for row in sub], dtype=torch.float32)
        if bool((min_p > 0).any()):
            # p >= min_p * p_max  <=>  z >= z_max + log(min_p)
            floor = z.max(dim=-1, keepdim=True).values + torch.log(min_p.clamp(min=1e-30))[:, None]
            z = z.masked_fill((min_p > 0)[:, None] & (z < floor), float("-inf"))
        tokens[index] = _draw(z, sub)
    chosen = logits.gather(-1, tokens[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    top_ids: list[list[int]] = [[] for _ in range(R)]
    top_lp: list[list[float]] = [[] for _ in range(R)]
    want = [row.cfg.logprobs or 0 for row in rows]
    if any(want):
        top = torch.topk(torch.log_softmax(logits, dim=-1), max(want), dim=-1)
        ids, vals = top.indices.tolist(), top.values.tolist()
        for r, k in enumerate(want):
            top_ids[r], top_lp[r] = ids[r][:k], vals[r][:k]
    return Picked(tokens=tokens.tolist(), logprobs=chosen.tolist(), top_ids=top_ids, top_logprobs=top_lp)
