"""What controllers that read answers share: the `extractor` / `pattern` parameters (the votes, best-of-N,
Dynasor and the searches), a tally of (weighted) votes, and scoring samples with a reward model or the verifier."""

from __future__ import annotations

import math
from collections.abc import Generator
from typing import Any

from controllers import extractors
from controllers.base import Controller, Param
from controllers.errors import ControllerError, ParamError
from controllers.extractors import Extractor
from controllers.tasks import Candidate, Generate, Progress, Prompt, Score

EXTRACTOR_PARAMS = (
    Param("extractor", "str", "auto", "how an answer is read from a text (a sample, or the chosen solution): auto "
          "(boxed, else last number), boxed, last_number, regex, or a registered name"),
    Param("pattern", "str", "", "regular expression for extractor=regex (first group, or the whole match)"),
)


def answer_extractor(extractor: str, pattern: str) -> Extractor:
    """The extractor the two parameters name; ParamError naming the field when they do not make one."""
    if extractor == "regex" and not pattern:
        raise ParamError("params.pattern", "is required when extractor is regex")
    if extractor != "regex" and extractor not in extractors.EXTRACTORS:
        known = ", ".join(["regex", *extractors.EXTRACTORS])
        raise ParamError("params.extractor", f"unknown extractor {extractor!r} (known: {known})")
    try:
        return extractors.get(extractor, pattern)
    except Exception as exc:  # re.error from a bad pattern
        raise ParamError("params.pattern", f"invalid regular expression: {exc}") from exc


def sample_candidates(n: int, prompt: Prompt, extract: Extractor) -> Generator[Any, Any, list[Candidate]]:
    """Draw n samples in one task (the worker prefills the prompt once) and read each one's answer;
    the task's failure fails the run."""
    yield Progress("sampling", f"drawing {n} samples", 0, n)
    task = Generate(prompt, n=n, branch="sample")
    yield task
    if not task.ok:
        raise ControllerError.from_failure(task.failure)
    return [Candidate(f"sample/{s.index}", s.text, extract(s.text), finish_reason=s.finish_reason)
            for s in task.output.samples]


class Tally:
    """Votes per answer, each with a weight (1 for a plain vote). Answers keep the order in which they
    were first seen, so a tie goes to the answer seen first and results are deterministic."""

    def __init__(self) -> None:
        self.weights: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, answer: str, weight: float = 1.0) -> None:
        self.weights[answer] = self.weights.get(answer, 0.0) + weight
        self.counts[answer] = self.counts.get(answer, 0) + 1

    def ranked(self) -> list[str]:
        return sorted(self.weights, key=lambda a: -self.weights[a])  # stable: ties stay in first-seen order

    @property
    def leader(self) -> str:
        ranked = self.ranked()
        return ranked[0] if ranked else ""

    def weight(self, rank: int) -> float:
        """The weight of the answer at `rank` (0 = leader), 0 when there are fewer answers."""
        ranked = self.ranked()
        return self.weights[ranked[rank]] if rank < len(ranked) else 0.0

    @property
    def total(self) -> float:
        return sum(self.weights.values())

    @property
    def votes(self) -> int:
        return sum(self.counts.values())

    def decided(self, remaining: int) -> bool:
        """Whether the leader stays ahead whatever `remaining` more votes (of weight 1 each) say."""
        return self.weight(0) > self.weight(1) + remaining

    def beta_certainty(self) -> float:
        """Adaptive-Consistency's Beta criterion on the two leading weights: P(the leader is the majority)."""
        return beta_majority_probability(int(self.weight(0)), int(self.weight(1)))

    def share(self) -> float:
        """The leader's part of all the weight (the consensus of DeepConf, the share of majority vote)."""
        total = self.total
        return self.weight(0) / total if total > 0 else 0.0

    def __bool__(self) -> bool:
        return bool(self.weights)


SCORE_KINDS = ("outcome", "process", "verifier")


def score_params(default_kind: str) -> tuple[Param, ...]:
    return (
        Param("score_kind", "str", default_kind, "what scores the samples: outcome (a reward model, one score "
              "each), process (a process reward model, the lowest step score) or verifier (the generation model "
              "asked whether the answer is right, P(yes))", choices=SCORE_KINDS),
        Param("reward_model", "str", "", "the reward model's pool (its model name); empty: any worker that "
              "scores this kind"),
        Param("step_separator", "str", "", "where a reasoning step ends, for score_kind=process; empty: the "
              "scorer's default (a blank line)"),
    )


def score_texts(controller: Controller, prompt: Prompt, texts: list[str]) -> Generator[Score, Any, list[float]]:
    """Score `texts` as answers to `prompt` with the controller's score_kind / reward_model / step_separator
    parameters, in one task; a failed task fails the run (nothing is left to rank)."""
    task = Score(prompt, list(texts), kind=controller.score_kind, model=controller.reward_model,
                 step_separator=controller.step_separator if controller.score_kind == "process" else "")
    yield task
    if not task.ok:
        raise ControllerError.from_failure(task.failure, f"scoring the samples ({controller.score_kind}) failed")
    if len(task.output.scores) != len(texts):
        raise ControllerError("INTERNAL", f"the scorer returned {len(task.output.scores)} scores for "
                                          f"{len(texts)} candidates")
    return list(task.output.scores)


def beta_majority_probability(v1: int, v2: int) -> float:
    """P(p1 > p2) under a uniform prior: the mass of Beta(v1 + 1, v2 + 1) above 1/2. For integer shapes
    a, b that is P(Binomial(a + b - 1, 1/2) <= a - 1), a finite sum."""
    a, b = v1 + 1, v2 + 1
    trials = a + b - 1
    return sum(math.comb(trials, j) for j in range(a)) / 2**trials
