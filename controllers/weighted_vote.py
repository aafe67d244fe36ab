"""WeightedMajorityVote: sample n reasoning paths, score each with a verifier, and vote with the scores.

Li et al., "Making Language Models Better Reasoners with Step-Aware Verifier" (DiVeRSe), ACL 2023:
the answer is argmax_y sum_i 1[y_i = y] * f(x, z_i, y_i), where f is the verifier's probability that
reasoning path z_i with answer y_i is correct. With f = 1 this is self-consistency (Wang et al.,
"Self-Consistency Improves Chain of Thought Reasoning in Language Models", ICLR 2023).

f comes from a Score task: an outcome reward model, a process reward model (its lowest step score, the
step-aware flavour) or the generation model as a yes/no verifier.
"""

from __future__ import annotations

import math

from controllers.answers import (
    EXTRACTOR_PARAMS,
    Tally,
    answer_extractor,
    sample_candidates,
    score_params,
    score_texts,
)
from controllers.base import Controller, Param, Result, register
from controllers.tasks import Intermediate, Progress, Prompt


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))  # no overflow either way


def vote_weights(scores: list[float], how: str) -> list[float]:
    """Scores as vote weights. The method sums probabilities; a reward model that emits logits (any
    score outside [0, 1]) is mapped through a sigmoid under "auto" so that adding a vote never lowers a sum."""
    if how == "sigmoid" or (how == "auto" and any(not 0.0 <= s <= 1.0 for s in scores)):
        return [_sigmoid(s) for s in scores]
    return list(scores)


@register
class WeightedMajorityVote(Controller):
    name = "weighted_majority_vote"
    description = ("Sample n answers, score each with a reward model or the verifier, and return the answer whose "
                   "samples have the largest summed score (DiVeRSe's voting verifier).")
    params = (
        Param("n", "int", 8, "number of samples to vote over", minimum=1),
        *score_params("verifier"),
        Param("weight", "str", "auto", "how a score becomes a vote weight: auto (a sigmoid when any score lies "
              "outside [0, 1], i.e. logits; else the score), score (as is), sigmoid",
              choices=("auto", "score", "sigmoid")),
        *EXTRACTOR_PARAMS,
    )

    def __init__(self, **params) -> None:
        super().__init__(**params)
        self.extract = answer_extractor(self.extractor, self.pattern)

    def run(self, prompt: Prompt):
        candidates = yield from sample_candidates(self.n, prompt, self.extract)
        # A sample with no answer abstains, so it is not worth scoring.
        voters = [c for c in candidates if c.answer]
        if not voters:
            return Result(answer="", candidates=candidates,
                          details={"votes": {}, "weights": {}, "share": 0.0, "abstained": len(candidates)})

        yield Progress("scoring", f"scoring {len(voters)} answers ({self.score_kind})", 0, len(voters))
        scores = yield from score_texts(self, prompt, [c.text for c in voters])
        weights = vote_weights(scores, self.weight)

        tally = Tally()
        for c, score, weight in zip(voters, scores, weights, strict=True):
            c.score = score
            tally.add(c.answer, weight)
            yield Intermediate("vote", c.branch, c.answer, weight,
                               {"score": score, "weights": dict(tally.weights), "votes": dict(tally.counts)})
        yield Progress("voting", f"{len(voters)} of {len(candidates)} samples gave an answer",
                       len(voters), len(voters))

        winner = tally.leader
        # The text shown is the best-scored path to the winning answer (max keeps the first on ties).
        best = max((c for c in voters if c.answer == winner), key=lambda c: c.score)
        return Result(
            answer=winner, text=best.text, candidates=candidates,
            details={"weights": dict(tally.weights), "votes": dict(tally.counts), "share": tally.share(),
                     "abstained": len(candidates) - len(voters), "score_kind": self.score_kind,
                     "plain_majority": max(tally.counts, key=lambda a: tally.counts[a])},
        )
