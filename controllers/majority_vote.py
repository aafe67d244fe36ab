"""MajorityVote (self-consistency): sample n reasoning paths, extract each answer, return the most common.

Wang et al., "Self-Consistency Improves Chain of Thought Reasoning in Language Models", ICLR 2023.
"""

from __future__ import annotations

from collections import Counter

from controllers import extractors
from controllers.base import Controller, ControllerError, Param, ParamError, Result
from controllers.tasks import Branch, Candidate, Generate, Intermediate, Progress, Prompt


class MajorityVote(Controller):
    name = "majority_vote"
    description = "Sample n answers and return the most frequent one (self-consistency)."
    params = (
        Param("n", "int", 8, "number of samples to vote over", minimum=1),
        Param("extractor", "str", "auto", "how an answer is read from a sample: auto (boxed, else last "
              "number), boxed, last_number, regex, or a registered name"),
        Param("pattern", "str", "", "regular expression for extractor=regex (first group, or the whole match)"),
        Param("inner", "str", "", "a controller whose answers are voted on, each vote a parallel branch with its "
              "default parameters (e.g. dynasor_cot); empty: plain samples, one worker task of n"),
    )

    def __init__(self, **params) -> None:
        super().__init__(**params)
        if self.extractor == "regex" and not self.pattern:
            raise ParamError("params.pattern", "is required when extractor is regex")
        if self.extractor != "regex" and self.extractor not in extractors.EXTRACTORS:
            raise ParamError("params.extractor",
                             f"unknown extractor {self.extractor!r} (known: regex, {', '.join(extractors.EXTRACTORS)})")
        try:
            self.extract = extractors.get(self.extractor, self.pattern)
        except Exception as exc:  # re.error from a bad pattern
            raise ParamError("params.pattern", f"invalid regular expression: {exc}") from exc
        if self.inner:
            from controllers.registry import REGISTRY  # the registry imports this module

            if self.inner not in REGISTRY or self.inner == self.name:
                known = ", ".join(n for n in REGISTRY if n != self.name)
                raise ParamError("params.inner", f"unknown controller {self.inner!r} (known: {known})")
            self.inner_class = REGISTRY[self.inner]

    def _samples(self, prompt: Prompt):
        """(branch, text, finish_reason) of each of the n votes: samples of one task, or inner runs."""
        if not self.inner:
            task = Generate(prompt, n=self.n, branch="sample")
            yield [task]
            if not task.ok:
                raise ControllerError.from_failure(task.failure)
            return [(f"sample/{s.index}", s.text, s.finish_reason) for s in task.output.samples]
        branches = [Branch(self.inner_class.from_params({}), prompt, name=f"sample/{i}") for i in range(self.n)]
        yield branches
        ok = [b for b in branches if b.ok]
        if not ok:
            raise ControllerError.from_failure(branches[0].failure)
        # An inner run's answer is what it extracted; its text is what the answer came from.
        return [(b.name, b.result.answer or b.result.text, "stop") for b in ok]

    def run(self, prompt: Prompt):
        yield Progress("sampling", f"drawing {self.n} samples" + (f" from {self.inner}" if self.inner else ""),
                       0, self.n)
        samples = yield from self._samples(prompt)

        votes: Counter[str] = Counter()
        first_text: dict[str, str] = {}
        candidates = []
        for branch, text, finish_reason in samples:
            answer = self.extract(text)
            candidates.append(Candidate(branch, text, answer, finish_reason=finish_reason))
            if not answer:
                continue  # no answer found: abstains rather than voting for ""
            votes[answer] += 1
            first_text.setdefault(answer, text)
            yield Intermediate("vote", branch, answer, float(votes[answer]), {"votes": dict(votes)})
        yield Progress("voting", f"{sum(votes.values())} of {self.n} samples gave an answer", self.n, self.n)

        if not votes:
            return Result(answer="", text="", candidates=candidates,
                          details={"votes": {}, "share": 0.0, "abstained": self.n})
        # Ties go to the answer seen first, which makes the result deterministic for fixed samples.
        top = max(votes.values())
        winner = next(a for a in votes if votes[a] == top)
        for c in candidates:
            c.score = float(votes.get(c.answer, 0))
        return Result(
            answer=winner, text=first_text[winner], candidates=candidates,
            details={"votes": dict(votes), "share": top / self.n, "abstained": self.n - sum(votes.values())},
        )
