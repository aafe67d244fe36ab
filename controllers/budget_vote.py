"""BudgetMajorityVote: majority vote that stops sampling once more samples can no longer matter.

Aggarwal et al., "Let's Sample Step by Step: Adaptive-Consistency for Efficient Reasoning and Coding
with LLMs", EMNLP 2023 (arXiv:2305.11860): draw samples one by one and stop as soon as a stopping
criterion says the majority is settled, instead of always drawing n. Their Beta criterion: with v1, v2
the counts of the two leading answers, stop once P(p1 > p2) = integral over [1/2, 1] of
Beta(v1 + 1, v2 + 1) exceeds C (0.95).

Here the samples run concurrently as separate tasks, and the vote is tallied as each one completes:
- criterion "decided" (default) stops once the leader cannot be overtaken, leader > runner-up + samples
  still to come, so the answer is exactly the one a full vote of n would give;
- criterion "beta" also stops on the Beta criterion (sooner, at the risk of another answer);
- `token_budget` caps the completion tokens of all samples together: once spent, nothing more is
  launched, the running samples are stopped and the completed ones vote.
Whatever is still running when the vote is settled is cancelled, so the workers free its KV at once.
"""

from __future__ import annotations

from collections.abc import Callable

from controllers.answers import EXTRACTOR_PARAMS, Tally, answer_extractor
from controllers.base import Controller, Param, Result, register
from controllers.errors import ControllerError
from controllers.tasks import Cancel, Candidate, Generate, Intermediate, Progress, Prompt, TaskFailure, Trace, WaitAny


class TokenBudget:
    """Completion tokens of all samples together, counted as they stream: each sample's stop_when is a meter
    that adds its own new tokens and stops the sample once the total reaches the limit (0: no limit)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.spent = 0

    @property
    def exhausted(self) -> bool:
        return self.limit > 0 and self.spent >= self.limit

    def meter(self) -> Callable[[Trace], bool]:
        counted = 0

        def stop_when(trace: Trace) -> bool:
            nonlocal counted
            self.spent += trace.token_count - counted
            counted = trace.token_count
            return self.exhausted

        return stop_when


@register
class BudgetMajorityVote(Controller):
    name = "budget_majority_vote"
    description = ("Majority vote over up to n concurrent samples that stops, cancelling the rest, as soon as the "
                   "answer is decided or a token budget is spent (Adaptive-Consistency).")
    params = (
        Param("n", "int", 8, "most samples to vote over", minimum=1),
        Param("token_budget", "int", 0, "completion tokens all samples may spend together; 0: no budget", minimum=0),
        Param("parallel", "int", 0, "samples running at once (a finished one makes room for the next); 0: all n",
              minimum=0),
        Param("criterion", "str", "decided", "when to stop: decided (the leader cannot be overtaken by the samples "
              "still to come) or beta (also once Adaptive-Consistency's Beta criterion exceeds threshold)",
              choices=("decided", "beta")),
        Param("threshold", "float", 0.95, "confidence the beta criterion needs", minimum=0.5, maximum=1.0),
        *EXTRACTOR_PARAMS,
    )

    def __init__(self, **params) -> None:
        super().__init__(**params)
        self.extract = answer_extractor(self.extractor, self.pattern)

    def run(self, prompt: Prompt):
        budget = TokenBudget(self.token_budget)
        waiting = [Generate(prompt, n=1, branch=f"sample/{i}", stop_when=budget.meter()) for i in range(self.n)]
        launched: list[Generate] = []
        running: list[Generate] = []
        parallel = min(self.parallel or self.n, self.n)
        tally, candidates, failures = Tally(), [], []
        stop = ""
        yield Progress("sampling", f"up to {self.n} samples, {parallel} at a time", 0, self.n)

        while waiting or running:
            while waiting and len(running) < parallel and not budget.exhausted:
                launched.append(waiting.pop(0))
                running.append(launched[-1])
            if not running:
                stop = "budget"  # spent before the next sample could start
                break
            done = yield WaitAny(list(running))
            for task in done:
                running.remove(task)
                yield from self._count(task, tally, candidates, failures)
            stop = self._settled(tally, len(running) + len(waiting)) or ("budget" if budget.exhausted else "")
            if stop:
                yield Intermediate("decided", "", tally.leader, tally.weight(0),
                                   {"by": stop, "votes": dict(tally.counts), "running": len(running),
                                    "not_started": len(waiting)})
                break

        if running:
            yield Cancel(list(running))
            for task in running:
                sample = task.output.samples[0] if task.ok and task.output.samples else None
                candidates.append(Candidate(f"{task.branch}/0", sample.text if sample else "",
                                            finish_reason="cancelled"))
        if not candidates:
            raise ControllerError.from_failure(failures[0], "every sample failed")
        cancelled = sum(1 for c in candidates if c.finish_reason == "cancelled")
        # With no early decision, samples cut off by their own stop_when mean the budget ended the vote.
        stop = stop or ("budget" if cancelled else "all")
        for c in candidates:
            c.score = float(tally.counts.get(c.answer, 0))
        yield Progress("voting", f"{tally.votes} votes from {len(launched)} samples launched", len(launched), self.n)

        winner = tally.leader
        return Result(
            answer=winner, text=next((c.text for c in candidates if c.answer == winner), "") if winner else "",
            candidates=candidates,
            details={"votes": dict(tally.counts), "share": tally.share(), "stopped_by": stop,
                     "launched": len(launched), "cancelled": cancelled, "failed": len(failures),
                     "tokens": budget.spent, "abstained": len(candidates) - cancelled - tally.votes},
        )

    def _settled(self, tally: Tally, remaining: int) -> str:
        """Why the vote needs no more samples ("decided", "beta"), or "" while it does."""
        if not remaining or not tally:
            return ""  # nothing left to wait for, or nothing to decide yet
        if tally.decided(remaining):
            return "decided"
        if self.criterion == "beta" and tally.beta_certainty() > self.threshold:
            return "beta"
        return ""

    def _count(self, task: Generate, tally: Tally, candidates: list[Candidate], failures: list[TaskFailure]):
        """Tally one finished sample: a vote, an abstention, a sample stopped by the budget, or a failure."""
        branch = f"{task.branch}/0"
        if not task.ok:
            failures.append(task.failure)
            yield Intermediate("failed", branch, details={"code": task.failure.code, "message": task.failure.message})
            return
        sample = task.output.samples[0]
        if task.stopped_early or sample.finish_reason == "cancelled":
            # Cut off by the token budget: an unfinished sample does not vote.
            candidates.append(Candidate(branch, sample.text, finish_reason="cancelled"))
            yield Intermediate("budget_stop", branch, value=float(sample.token_count))
            return
        answer = self.extract(sample.text)
        candidates.append(Candidate(branch, sample.text, answer, finish_reason=sample.finish_reason))
        if answer:
            tally.add(answer)
            yield Intermediate("vote", branch, answer, float(tally.counts[answer]), {"votes": dict(tally.counts)})
