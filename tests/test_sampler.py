"""Sampling rules on hand-made logits: each parameter does what the contract says, per row."""

from __future__ import annotations

import torch

from torch_engine.sampler import Row, sample
from trellis_rpc.sampling import SamplingConfig

VOCAB = 8


def logits(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def row(cfg: SamplingConfig, seed: int | None = 0, generated=0, stop_ids=(), prompt=(), output=()) -> Row:
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return Row(cfg, gen, generated, list(stop_ids), list(prompt), list(output))


def draw(x: torch.Tensor, cfg: SamplingConfig, seed=0, **kw) -> list[int]:
    return sample(x, [row(cfg, seed + r, **kw) for r in range(x.shape[0])]).tokens


def test_greedy_takes_argmax_and_reports_raw_logprobs():
    x = logits([0.0, 3.0, 1.0, 0, 0, 0, 0, 0])
    p = sample(x, [row(SamplingConfig(temperature=0.0, logprobs=2))])
    assert p.tokens == [1]
    assert abs(p.logprobs[0] - torch.log_softmax(x, -1)[0, 1].item()) < 1e-6
    assert p.top_ids == [[1, 2]]


def test_top_k_one_top_p_tiny_and_min_p_one_are_greedy():
    x = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(1))
    best = x.argmax(-1).tolist()
    for cfg in (SamplingConfig(top_k=1), SamplingConfig(top_p=1e-6), SamplingConfig(min_p=1.0)):
        for seed in range(5):
            assert draw(x, cfg, seed=seed * 10) == best


def test_top_k_never_draws_outside_the_k_best():
    x = logits([5.0, 4.0, 3.0, 2.0, 1.0, 0.0, -1.0, -2.0])
    seen = {draw(x, SamplingConfig(temperature=5.0, top_k=3), seed=s)[0] for s in range(200)}
    assert seen <= {0, 1, 2} and len(seen) == 3


def test_top_p_keeps_the_smallest_set_reaching_p():
    # probabilities 0.5, 0.3, 0.2: top_p=0.7 keeps {0, 1} (0.5 < 0.7 so the second is needed).
    x = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    seen = {draw(x, SamplingConfig(top_p=0.7), seed=s)[0] for s in range(200)}
    assert seen == {0, 1}


def test_min_p_drops_tokens_below_the_fraction_of_the_best():
    x = torch.log(torch.tensor([[0.6, 0.3, 0.1]]))  # min_p 0.4 -> floor 0.24 drops token 2
    seen = {draw(x, SamplingConfig(min_p=0.4), seed=s)[0] for s in range(200)}
    assert seen == {0, 1}


def test_sampling_follows_the_distribution():
    x = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    counts = torch.bincount(torch.tensor([draw(x, SamplingConfig(), seed=s)[0] for s in range(2000)]), minlength=3)
    assert torch.allclose(counts.float() / 2000, torch.tensor([0.7, 0.2, 0.1]), atol=0.04)


def test_rows_keep_their_own_parameters_in_one_batch():
    x = logits(*[[0.0, 3.0, 2.9, 0, 0, 0, 0, 0]] * 3)
    rows = [row(SamplingConfig(temperature=0.0)), row(SamplingConfig(temperature=50.0), seed=5),
            row(SamplingConfig(temperature=0.0, repetition_penalty=2.0), prompt=[1])]
    tokens = sample(x, rows).tokens
    assert tokens[0] == 1 and tokens[2] == 2


def test_seed_reproduces_and_differs():
    x = torch.zeros(3, 50)
    a = draw(x, SamplingConfig(), seed=7)
    assert a == draw(x, SamplingConfig(), seed=7)
    assert any(draw(x, SamplingConfig(), seed=s) != a for s in range(8, 12))


def test_min_tokens_masks_stop_tokens_until_reached():
    x = logits([0.0, 0.0, 9.0, 0, 0, 0, 0, 0])  # token 2 (say EOS) dominates
    cfg = SamplingConfig(temperature=0.0, min_tokens=3)
    assert draw(x, cfg, generated=1, stop_ids=[2])[0] != 2
    assert draw(x, cfg, generated=3, stop_ids=[2])[0] == 2


def test_repetition_penalty_covers_the_prompt():
    x = logits([2.0, 1.9, 0, 0, 0, 0, 0, 0])
    assert draw(x, SamplingConfig(temperature=0.0))[0] == 0
    assert draw(x, SamplingConfig(temperature=0.0, repetition_penalty=1.5), prompt=[0])[0] == 1


def test_frequency_and_presence_penalties_use_output_counts():
    x = logits([2.0, 1.5, 0, 0, 0, 0, 0, 0])
    assert draw(x, SamplingConfig(temperature=0.0, frequency_penalty=0.3), output=[0, 0])[0] == 1
    assert draw(x, SamplingConfig(temperature=0.0, presence_penalty=0.6), output=[0, 0])[0] == 1
    assert draw(x, SamplingConfig(temperature=0.0, presence_penalty=0.4), output=[0, 0])[0] == 0
    assert draw(x, SamplingConfig(temperature=0.0, frequency_penalty=0.3), prompt=[0, 0])[0] == 0
