"""BestOfN: sample n solutions, score each with a verifier, return the one it ranks highest.

Cobbe et al., "Training Verifiers to Solve Math Word Problems", arXiv:2110.14168, 2021: at test time
the generator samples many candidate solutions, the verifier scores each, and the highest-ranked
solution is the answer.

The verifier is a Score task: the generation model asked whether the answer is right (the default),
an outcome reward model, or a process reward model (its lowest step score).
"""

from __future__ import annotations

from controllers.answers import EXTRACTOR_PARAMS, answer_extractor, sample_candidates, score_params, score_texts
from controllers.base import Controller, Param, Result, register
from controllers.tasks import Intermediate, Progress, Prompt


@register
class BestOfN(Controller):
    name = "best_of_n"
    description = "Sample n solutions, score each with the verifier or a reward model, and return the best one."
    params = (
        Param("n", "int", 8, "number of samples to choose from", minimum=1),
        *score_params("verifier"),
        *EXTRACTOR_PARAMS,
    )

    def __init__(self, **params) -> None:
        super().__init__(**params)
        self.extract = answer_extractor(self.extractor, self.pattern)

    def run(self, prompt: Prompt):
        candidates = yield from sample_candidates(self.n, prompt, self.extract)
        # A blank sample cannot be the best one, and a process scorer rejects a candidate with no step.
        ranked = [c for c in candidates if c.text.strip()]
        if not ranked:
            return Result(answer="", candidates=candidates, details={"best": "", "scores": {}})

        yield Progress("scoring", f"scoring {len(ranked)} samples ({self.score_kind})", 0, len(ranked))
        scores = yield from score_texts(self, prompt, [c.text for c in ranked])
        best = None
        for c, score in zip(ranked, scores, strict=True):
            c.score = score
            if best is None or score > best.score:  # strict: a tie keeps the first sample
                best = c
            yield Intermediate("score", c.branch, c.answer, score, {"best": best.branch, "best_score": best.score})

        return Result(
            # The extracted answer when there is one; otherwise the solution itself is the answer.
            answer=best.answer or best.text, text=best.text, candidates=candidates,
            details={"best": best.branch, "best_score": best.score, "score_kind": self.score_kind,
                     "scores": {c.branch: c.score for c in ranked}},
        )
