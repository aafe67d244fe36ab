"""MajorityVote (self-consistency): sample n reasoning paths, extract each answer, return the most common.

Wang et al., "Self-Consistency Improves Chain of Thought Reasoning in Language Models", ICLR 2023.

The vote is tallied as samples finish, and once the leader cannot be overtaken (it has more votes than the
runner-up plus every sample still running) the rest are cancelled: the answer is the one all n would give, and
their tokens are not spent (certaindex's "stop the decided", in the one case where it cannot change the answer;
`stop_decided=false` draws all n). Cancelled samples abstain; `details.counted` says how many voted.

Where the router offers reallocation (`--reallocate certaindex`) and reports it is short of capacity, the vote
also stops once Adaptive-Consistency's Beta criterion puts the leader ahead with the router's certainty (at least
two votes); that can change the answer, so it is the operator's choice. `details.stopped` says why it stopped.
"""

from __future__ import annotations

from controllers.answers import EXTRACTOR_PARAMS, Tally, answer_extractor
from controllers.base import REGISTRY, Controller, Param, Reallocation, Result, register
from controllers.errors import ControllerError, ParamError
from controllers.tasks import Branch, Candidate, Generate, Intermediate, Progress, Prompt, Trace


@register
class MajorityVote(Controller):
    name = "majority_vote"
    description = "Sample n answers and return the most frequent one (self-consistency)."
    params = (
        Param("n", "int", 8, "number of samples to vote over", minimum=1),
        *EXTRACTOR_PARAMS,
        Param("stop_decided", "bool", True, "cancel the samples still running once the vote is decided (the "
              "answer cannot change; their texts are not returned)"),
        Param("inner", "str", "", "a controller whose answers are voted on, each vote a parallel branch with its "
              "default parameters (e.g. dynasor_cot); empty: plain samples, one worker task of n"),
    )

    def __init__(self, **params) -> None:
        super().__init__(**params)
        self.extract = answer_extractor(self.extractor, self.pattern)
        self.decided: Decided | None = None
        if self.inner:
            if self.inner not in REGISTRY or self.inner == self.name:
                known = ", ".join(n for n in REGISTRY if n != self.name)
                raise ParamError("params.inner", f"unknown controller {self.inner!r} (known: {known})")
            self.inner_class = REGISTRY[self.inner]

    def _samples(self, prompt: Prompt):
        """(branch, text, finish_reason) of each of the n votes: samples of one task, or inner runs."""
        if not self.inner:
            self.decided = Decided(self.n, self.extract, self.reallocation) if self.stop_decided else None
            task = Generate(prompt, n=self.n, branch="sample", stop_when=self.decided)
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

        votes = Tally()
        first_text: dict[str, str] = {}
        candidates = []
        for branch, text, finish_reason in samples:
            # A sample cancelled because the vote was decided is unfinished: it abstains.
            answer = self.extract(text) if finish_reason != "cancelled" else ""
            candidates.append(Candidate(branch, text, answer, finish_reason=finish_reason))
            if not answer:
                continue  # no answer found: abstains rather than voting for ""
            votes.add(answer)
            first_text.setdefault(answer, text)
            yield Intermediate("vote", branch, answer, float(votes.counts[answer]), {"votes": dict(votes.counts)})
        yield Progress("voting", f"{votes.votes} of {self.n} samples gave an answer", self.n, self.n)

        if not votes:
            return Result(answer="", text="", candidates=candidates,
                          details={"votes": {}, "share": 0.0, "abstained": self.n})
        # Ties go to the answer seen first, which makes the result deterministic for fixed samples.
        winner = votes.leader
        for c in candidates:
            c.score = float(votes.counts.get(c.answer, 0))
        return Result(
            answer=winner, text=first_text[winner], candidates=candidates,
            details={"votes": dict(votes.counts), "share": votes.counts[winner] / self.n,
                     "abstained": self.n - votes.votes,
                     "counted": sum(1 for _, _, reason in samples if reason != "cancelled"),
                     "stopped": self.decided.reason if self.decided is not None else ""},
        )


class Decided:
    """Generate.stop_when for a vote over the task's n samples: counts each sample's answer when it finishes,
    and stops the task once the leader has more votes than the runner-up plus the samples not yet finished
    (reason "decided"), or, with a reallocation offer and the service under load, once the leader is ahead with
    the offered certainty (reason "certain")."""

    def __init__(self, n: int, extract, reallocation: Reallocation | None = None) -> None:
        self.n = n
        self.extract = extract
        self.reallocation = reallocation
        self.votes = Tally()
        self.finished: set[int] = set()
        self.reason = ""

    def __call__(self, trace: Trace) -> bool:
        if not trace.finish_reason or trace.index in self.finished:
            return False
        self.finished.add(trace.index)
        answer = self.extract(trace.text)
        if answer:
            self.votes.add(answer)
        running = self.n - len(self.finished)
        if running and self.votes.decided(running):
            self.reason = "decided"
        elif (running and self.reallocation is not None and self.votes.weight(0) >= 2
              and self.reallocation.under_load() and self.votes.beta_certainty() >= self.reallocation.certainty):
            self.reason = "certain"
        return bool(self.reason)
