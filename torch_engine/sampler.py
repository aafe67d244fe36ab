"""Next-token selection for a batch of rows, each with its own sampling parameters.

Per row, in the usual order (vLLM, HF): min_tokens masking of stop tokens, repetition penalty over
prompt and output, frequency/presence penalties over output, then greedy, or temperature -> top_k
-> top_p -> min_p -> draw (inverse CDF, one uniform number per row from the row's own generator when
seeded). Reported logprobs come from the model's raw distribution, before any of this.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

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


# top_p looks for its cut-off among the best 256 tokens, then 4096, then all: a full sort of a 49k
# vocabulary costs ~50x more and is only needed when the smaller windows do not reach the mass.
_TOP_P_WINDOWS = (256, 4096)


def _top_p_mask(z: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Nucleus sampling on rows of z (tempered, top_k-masked): keep a token while the mass of the
    better tokens is below top_p; the first token always stays. Rows with top_p >= 1 are untouched.
    Works on probabilities (one softmax) rather than on logits minus a logsumexp, which is several
    passes over the vocabulary on CPU."""
    R, V = z.shape
    p = torch.softmax(z, dim=-1)
    threshold = torch.full((R,), -1.0)                               # -1: keep every token
    todo = torch.nonzero(top_p < 1.0).flatten()
    for k in (*(w for w in _TOP_P_WINDOWS if w < V), V):
        if todo.numel() == 0:
            break
        rows = p[todo]
        vals = torch.topk(rows, k, dim=-1).values if k < V else torch.sort(rows, dim=-1, descending=True).values
        before = vals.cumsum(-1) - vals
        want = top_p[todo]
        kept = (before < want[:, None]).sum(-1).clamp(min=1)
        cut = vals.gather(1, (kept - 1)[:, None]).squeeze(1)
        reached = (before[:, -1] + vals[:, -1] >= want) | (k == V)
        threshold[todo[reached]] = cut[reached]
        todo = todo[~reached]
    return p < threshold[:, None]


_DRAW_BLOCK = 256


def _draw(z: torch.Tensor, rows: list[Row]) -> torch.Tensor:
    """One token per row from softmax(z) by inverse CDF: a single uniform number per row (a seeded row
    takes it from its own generator, so batch company cannot change its draw). Noise per vocabulary
    entry (Gumbel, exponential race) costs ~10x more here: elementwise passes over [rows, vocab].
    The CDF is two-level: float64 sums of 256-token blocks pick the block, then a cumsum inside that
    block picks the token. A float64 cumsum over the whole vocabulary was most of the sampling time."""
    R, V = z.shape
    p = torch.softmax(z, dim=-1)                                     # masked tokens are 0
    pad = -V % _DRAW_BLOCK
    blocks = (F.pad(p, (0, pad)) if pad else p).view(R, -1, _DRAW_BLOCK)
    ends = blocks.sum(-1).double().cumsum_(-1)                       # [R, blocks] running mass
    # Drawn on the CPU, where the per-sample generators live, whatever device the logits are on.
    u = torch.rand(R, dtype=torch.float64, device="cpu")
    for r, row in enumerate(rows):
        if row.generator is not None:
            u[r] = torch.rand(1, dtype=torch.float64, generator=row.generator, device="cpu")
    target = (u.to(ends.device) * ends[:, -1]).unsqueeze(-1)
    # right=True: the first block whose running mass exceeds the target, so never an empty block.
    b = torch.searchsorted(ends, target, right=True).clamp_(max=ends.shape[-1] - 1)
    before = torch.where(b > 0, ends.gather(1, (b - 1).clamp(min=0)), torch.zeros_like(target))
    inner = blocks[torch.arange(R), b.squeeze(-1)]                   # [R, block]
    i = torch.searchsorted(inner.double().cumsum_(-1), target - before, right=True).squeeze(-1)
    # Rounding between the two sums may overshoot the block: fall back to its last live token.
    last = (inner > 0).int().cumsum(-1).argmax(-1)
    i = torch.minimum(i, last)
    return (b.squeeze(-1) * _DRAW_BLOCK + i).clamp_(max=V - 1)


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
    drawn_rows = [r for r, row in enumerate(rows) if not row.cfg.greedy]
    if len(drawn_rows) < R:
        tokens = x.argmax(dim=-1)
    else:
        tokens = torch.empty(R, dtype=torch.long)
    if drawn_rows:
        sub = [rows[r] for r in drawn_rows]
        index = torch.tensor(drawn_rows)
        temps = torch.tensor([row.cfg.temperature for row in sub], dtype=torch.float32)
        z = (x if len(drawn_rows) == R else x[index]) / temps[:, None]
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
    # One fused log_softmax pass: torch.logsumexp is several passes over [rows, vocab] on CPU.
    logprobs = torch.log_softmax(logits, dim=-1)
    chosen = logprobs.gather(-1, tokens[:, None]).squeeze(-1)
    top_ids: list[list[int]] = [[] for _ in range(R)]
    top_lp: list[list[float]] = [[] for _ in range(R)]
    want = [row.cfg.logprobs or 0 for row in rows]
    if any(want):
        top = torch.topk(logprobs, max(want), dim=-1)
        ids, vals = top.indices.tolist(), top.values.tolist()
        for r, k in enumerate(want):
            top_ids[r], top_lp[r] = ids[r][:k], vals[r][:k]
    return Picked(tokens=tokens.tolist(), logprobs=chosen.tolist(), top_ids=top_ids, top_logprobs=top_lp)
