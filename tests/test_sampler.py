"""Sampling rules on hand-made logits: each parameter does what the contract says."""

from __future__ import annotations

import torch

from trellis_rpc.sampling import SamplingConfig
from worker_cpu.sampler import RowPenaltyState, pick

VOCAB = 8


def logits(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def draw(x: torch.Tensor, cfg: SamplingConfig, prompt=(), generated=0, banned=(), seed=0, counts=None):
    state = RowPenaltyState(list(prompt), x.shape[0], x.shape[1])
    if counts is not None:
        state.output_counts = counts.clone()
        state.seen |= counts > 0
    gen = torch.Generator().manual_seed(seed)
    return pick(x, cfg, state, generated, list(banned), gen)


def test_greedy_takes_argmax_and_reports_raw_logprobs():
    x = logits([0.0, 3.0, 1.0, 0, 0, 0, 0, 0])
    p = draw(x, SamplingConfig(temperature=0.0, logprobs=2))
    assert p.tokens.tolist() == [1]
    assert torch.allclose(p.logprobs, torch.log_softmax(x, -1)[0, 1:2])
    assert p.top_ids.tolist() == [[1, 2]]


def test_top_k_one_top_p_tiny_and_min_p_one_are_greedy():
    x = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(1))
    best = x.argmax(-1).tolist()
    for cfg in (SamplingConfig(top_k=1), SamplingConfig(top_p=1e-6), SamplingConfig(min_p=1.0)):
        for seed in range(5):
            assert draw(x, cfg, seed=seed).tokens.tolist() == best


def test_top_k_never_draws_outside_the_k_best():
    x = logits([5.0, 4.0, 3.0, 2.0, 1.0, 0.0, -1.0, -2.0])
    seen = {draw(x, SamplingConfig(temperature=5.0, top_k=3), seed=s).tokens.item() for s in range(200)}
    assert seen <= {0, 1, 2} and len(seen) == 3


def test_top_p_keeps_the_smallest_set_reaching_p():
    # probabilities 0.5, 0.3, 0.2: top_p=0.7 keeps {0, 1} (0.5 < 0.7 so the second is needed).
    x = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    seen = {draw(x, SamplingConfig(top_p=0.7), seed=s).tokens.item() for s in range(200)}
    assert seen == {0, 1}


def test_min_p_drops_tokens_below_the_fraction_of_the_best():
    x = torch.log(torch.tensor([[0.6, 0.3, 0.1]]))  # min_p 0.4 -> floor 0.24 drops token 2
    seen = {draw(x, SamplingConfig(min_p=0.4), seed=s).tokens.item() for s in range(200)}
    assert seen == {0, 1}


def test_seed_reproduces_and_differs():
    x = torch.zeros(3, 50)
    a = draw(x, SamplingConfig(), seed=7).tokens.tolist()
    assert a == draw(x, SamplingConfig(), seed=7).tokens.tolist()
    assert any(draw(x, SamplingConfig(), seed=s).tokens.tolist() != a for s in range(8, 12))


def test_min_tokens_masks_stop_tokens_until_reached():
    x = logits([0.0, 0.0, 9.0, 0, 0, 0, 0, 0])  # token 2 (say EOS) dominates
    assert draw(x, SamplingConfig(temperature=0.0, min_tokens=3), generated=1, banned=[2]).tokens.item() != 2
    assert draw(x, SamplingConfig(temperature=0.0, min_tokens=3), generated=3, banned=[2]).tokens.item() == 2


def test_repetition_penalty_covers_the_prompt():
    x = logits([2.0, 1.9, 0, 0, 0, 0, 0, 0])
    assert draw(x, SamplingConfig(temperature=0.0)).tokens.item() == 0
    assert draw(x, SamplingConfig(temperature=0.0, repetition_penalty=1.5), prompt=[0]).tokens.item() == 1


def test_frequency_and_presence_penalties_use_output_counts():
    x = logits([2.0, 1.5, 0, 0, 0, 0, 0, 0])
    counts = torch.zeros(1, VOCAB)
    counts[0, 0] = 2
    assert draw(x, SamplingConfig(temperature=0.0, frequency_penalty=0.3), counts=counts).tokens.item() == 1
    assert draw(x, SamplingConfig(temperature=0.0, presence_penalty=0.6), counts=counts).tokens.item() == 1
    assert draw(x, SamplingConfig(temperature=0.0, presence_penalty=0.4), counts=counts).tokens.item() == 0
