"""DeepConf: vote over reasoning traces weighted by the model's own confidence, and leave out the traces
it is least sure of, after the fact (offline) or while they are generated (online).

Fu, Wang, Tian, Zhao, "Deep Think with Confidence", arXiv:2508.15260, 2025.

- Token confidence C_i = -(1/k) sum_j log P_i(j) over the top-k tokens at position i (high = peaked).
- Group confidence C_G = the mean token confidence over a window of `window` tokens; windows slide one
  token at a time. A trace shorter than one window is a single group (as in the authors' code).
- Trace confidence: the lowest group confidence (default), the mean of the bottom 10% of groups, the
  tail (mean of the last `tail_tokens` tokens) or the mean token confidence.
- Offline: keep the top `keep_ratio` (eta) of the traces by confidence; the answer is argmax_a of
  sum_t C_t * 1[answer(t) = a] over the kept traces.
- Online: `warmup` (N_init) traces run to the end; the stopping bar is s = Percentile_{100 - eta} of their
  lowest group confidences (eta = 10%: the 90th percentile, DeepConf-low; eta = 90%: the 10th,
  DeepConf-high), and warm-up traces below s do not vote. Every further trace is stopped as soon as a
  group confidence falls below s, and stopped traces do not vote. Adaptive sampling stops launching once
  the leading answer holds a share beta >= tau of the vote weight, or once n traces were drawn.
"""

from __future__ import annotations

import math
from collections import deque

from controllers.answers import EXTRACTOR_PARAMS, Tally, answer_extractor
from controllers.base import Controller, Param, Result, register
from controllers.errors import ControllerError, ParamError
from controllers.tasks import (
    Cancel,
    Candidate,
    Generate,
    Intermediate,
    Progress,
    Prompt,
    SampleOut,
    TaskFailure,
    Trace,
    WaitAny,
)

MEASURES = ("lowest", "bottom10", "tail", "mean")


# ---- confidence -------------------------------------------------------------------------------


def token_confidence(top_logprobs: list[float]) -> float:
    return -sum(top_logprobs) / len(top_logprobs) if top_logprobs else 0.0


class SlidingMean:
    """The mean of the last `window` values, once there are that many."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.values: deque[float] = deque()
        self.total = 0.0

    def add(self, value: float) -> float | None:
        self.values.append(value)
        self.total += value
        if len(self.values) > self.window:
            self.total -= self.values.popleft()
        return self.total / self.window if len(self.values) == self.window else None


def group_confidences(confidences: list[float], window: int) -> list[float]:
    if len(confidences) < window:
        return [sum(confidences) / len(confidences)] if confidences else []
    groups = SlidingMean(window)
    return [g for g in (groups.add(c) for c in confidences) if g is not None]


def trace_confidence(confidences: list[float], measure: str, window: int, tail_tokens: int) -> float:
    if not confidences:
        return 0.0
    if measure == "mean":
        return sum(confidences) / len(confidences)
    if measure == "tail":
        tail = confidences[-tail_tokens:]
        return sum(tail) / len(tail)
    groups = group_confidences(confidences, window)
    if measure == "bottom10":
        bottom = sorted(groups)[:max(1, len(groups) // 10)]
        return sum(bottom) / len(bottom)
    return min(groups)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile with linear interpolation between ranks (numpy's default)."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def confidences_of(sample: SampleOut, branch: str, logprobs: int) -> list[float]:
    if sample.token_count and not sample.top_logprobs:
        raise ControllerError("FAILED_PRECONDITION", f"{branch} came back without top logprobs (sampling.logprobs="
                                                     f"{logprobs}): DeepConf needs them to measure confidence")
    return [token_confidence(top) for top in sample.top_logprobs]


CONFIDENCE_PARAMS = (
    Param("logprobs", "int", 20, "top-k log-probabilities per token that token confidence averages", minimum=1,
          maximum=20),
    Param("window", "int", 2048, "tokens in a group (the sliding window of group confidence)", minimum=1),
)


# ---- offline ----------------------------------------------------------------------------------


@register
class DeepConfOffline(Controller):
    name = "deepconf_offline"
    description = ("Sample n traces with logprobs, keep the most confident ones and vote weighted by confidence "
                   "(DeepConf offline).")
    params = (
        Param("n", "int", 16, "traces to sample", minimum=1),
        *CONFIDENCE_PARAMS,
        Param("confidence", "str", "lowest", "trace confidence: lowest (group), bottom10 (mean of the lowest 10% "
              "of groups), tail (mean of the last tail_tokens tokens) or mean (all tokens)", choices=MEASURES),
        Param("tail_tokens", "int", 2048, "tokens the tail confidence averages", minimum=1),
        Param("keep_ratio", "float", 0.9, "share of the answering traces kept, most confident first (eta: 0.1 is "
              "DeepConf-low, 0.9 DeepConf-high)", minimum=0.0, maximum=1.0),
        *EXTRACTOR_PARAMS,
    )

    def __init__(self, **params) -> None:
        super().__init__(**params)
        self.extract = answer_extractor(self.extractor, self.pattern)

    def run(self, prompt: Prompt):
        yield Progress("sampling", f"drawing {self.n} traces with top-{self.logprobs} logprobs", 0, self.n)
        task = Generate(prompt, n=self.n, sampling={"logprobs": self.logprobs}, branch="trace")
        yield task
        if not task.ok:
            raise ControllerError.from_failure(task.failure)
        candidates = []
        for s in task.output.samples:
            branch = f"trace/{s.index}"
            confidence = trace_confidence(confidences_of(s, branch, self.logprobs), self.confidence, self.window,
                                          self.tail_tokens)
            candidates.append(Candidate(branch, s.text, self.extract(s.text), confidence, s.finish_reason))

        voters = [c for c in candidates if c.answer]
        keep = max(1, int(len(voters) * self.keep_ratio + 1e-9))  # the epsilon: 10 * 0.9 must keep 9, not 8
        kept = {c.branch for c in sorted(voters, key=lambda c: -c.score)[:keep]}
        for c in candidates:
            yield Intermediate("confidence", c.branch, c.answer, c.score, {"kept": c.branch in kept})

        tally = Tally()
        for c in candidates:
            if c.branch in kept:
                tally.add(c.answer, c.score)
                yield Intermediate("vote", c.branch, c.answer, c.score, {"weights": dict(tally.weights)})
        yield Progress("voting", f"{len(kept)} of {len(voters)} answering traces kept", len(kept), len(voters))

        winner = tally.leader
        best = max((c for c in candidates if c.branch in kept and c.answer == winner), key=lambda c: c.score,
                   default=None)
        return Result(
            answer=winner, text=best.text if best else "", candidates=candidates,
            details={"weights": dict(tally.weights), "votes": dict(tally.counts), "share": tally.share(),
                     "kept": sorted(kept), "confidence": self.confidence,
                     "abstained": len(candidates) - len(voters)},
        )


# ---- online -----------------------------------------------------------------------------------


class StopBelowBar:
    """Generate.stop_when of one online trace: True once a full window's group confidence is below the bar."""

    def __init__(self, window: int, bar: float) -> None:
        self.groups = SlidingMean(window)
        self.bar = bar
        self.seen = 0                  # tokens of the trace already counted
        self.stopped_at: float | None = None

    def __call__(self, trace: Trace) -> bool:
        fresh, self.seen = trace.top_logprobs[self.seen:], len(trace.top_logprobs)
        for top in fresh:  # every window, even when one delta carries several tokens
            group = self.groups.add(token_confidence(top))
            if group is not None and group < self.bar:
                self.stopped_at = group
                return True
        return False


@register
class DeepConfOnline(Controller):
    name = "deepconf_online"
    description = ("Warm-up traces set a confidence bar; further traces stop as soon as their confidence falls "
                   "below it, until the confidence-weighted vote reaches consensus (DeepConf online).")
    params = (
        Param("n", "int", 16, "traces at most, warm-up included (the budget B)", minimum=1),
        Param("warmup", "int", 4, "traces generated in full first, to set the stopping bar (N_init)", minimum=1),
        *CONFIDENCE_PARAMS,
        Param("keep_ratio", "float", 0.9, "eta: the bar is the (1 - eta) percentile of the warm-up confidences "
              "(0.1 is DeepConf-low, 0.9 DeepConf-high)", minimum=0.0, maximum=1.0),
        Param("adaptive", "bool", True, "stop launching traces once the vote reaches consensus"),
        Param("consensus", "float", 0.95, "tau: the leading answer's share of the vote weight that is consensus",
              minimum=0.0, maximum=1.0),
        Param("parallel", "int", 0, "online traces running at once; 0: all that remain", minimum=0),
        *EXTRACTOR_PARAMS,
    )

    def __init__(self, **params) -> None:
        super().__init__(**params)
        if self.warmup > self.n:
            raise ParamError("params.warmup", f"must be <= n ({self.n}), got {self.warmup}")
        self.extract = answer_extractor(self.extractor, self.pattern)

    def run(self, prompt: Prompt):
        sampling = {"logprobs": self.logprobs}
        yield Progress("warmup", f"{self.warmup} warm-up traces set the confidence bar", 0, self.n)
        warm = Generate(prompt, n=self.warmup, sampling=sampling, branch="warmup")
        yield warm
        if not warm.ok:
            raise ControllerError.from_failure(warm.failure, "warm-up failed")
        candidates = [self._finished(s, f"warmup/{s.index}") for s in warm.output.samples]
        bar = percentile([c.score for c in candidates], 100.0 * (1.0 - self.keep_ratio))
        yield Intermediate("threshold", "", "", bar, {"warmup": {c.branch: c.score for c in candidates}})

        tally = Tally()
        for c in candidates:
            yield from self._vote(c, bar, tally)

        waiting = list(range(self.warmup, self.n))
        running: list[Generate] = []
        parallel = self.parallel or len(waiting)
        failures: list[TaskFailure] = []
        stopped = 0
        while waiting or running:
            if self.adaptive and tally and tally.share() >= self.consensus:
                yield Intermediate("consensus", "", tally.leader, tally.share(),
                                   {"weights": dict(tally.weights), "running": len(running),
                                    "not_started": len(waiting)})
                break
            while waiting and len(running) < parallel:
                running.append(Generate(prompt, n=1, sampling=sampling, branch=f"trace/{waiting.pop(0)}",
                                        stop_when=StopBelowBar(self.window, bar)))
            done = yield WaitAny(list(running))
            for task in done:
                running.remove(task)
                branch = f"{task.branch}/0"
                if not task.ok:
                    failures.append(task.failure)
                    yield Intermediate("failed", branch, details={"code": task.failure.code,
                                                                  "message": task.failure.message})
                    continue
                sample = task.output.samples[0]
                if task.stopped_early:
                    stopped += 1
                    at = task.stop_when.stopped_at
                    candidates.append(Candidate(branch, sample.text, "", at, "cancelled"))
                    yield Intermediate("early_stop", branch, "", at, {"tokens": sample.token_count, "bar": bar})
                    continue
                c = self._finished(sample, branch)
                candidates.append(c)
                yield from self._vote(c, bar, tally)

        if running:  # consensus reached: the rest cannot change the answer enough to matter
            yield Cancel(list(running))
            for task in running:
                text = task.output.samples[0].text if task.ok else ""
                candidates.append(Candidate(f"{task.branch}/0", text, finish_reason="cancelled"))
        if not tally and failures:
            raise ControllerError.from_failure(failures[0], "no trace voted and traces failed")

        winner = tally.leader
        best = max((c for c in candidates if c.answer == winner and c.score >= bar), key=lambda c: c.score,
                   default=None)
        yield Progress("voting", f"{tally.votes} traces voted, {stopped} stopped early", tally.votes, self.n)
        return Result(
            answer=winner, text=best.text if best and winner else "", candidates=candidates,
            details={"weights": dict(tally.weights), "votes": dict(tally.counts), "share": tally.share(),
                     "bar": bar, "traces": len(candidates), "early_stopped": stopped, "failed": len(failures),
                     "cancelled": len(running)},
        )

    def _finished(self, sample: SampleOut, branch: str) -> Candidate:
        """A trace that ran to its end, scored by its lowest group confidence (the online measure)."""
        confidence = trace_confidence(confidences_of(sample, branch, self.logprobs), "lowest", self.window, 1)
        return Candidate(branch, sample.text, self.extract(sample.text), confidence, sample.finish_reason)

    def _vote(self, c: Candidate, bar: float, tally: Tally):
        # A finished trace below the bar (one shorter than a window is never stopped) is filtered like a stopped one.
        if c.answer and c.score >= bar:
            tally.add(c.answer, c.score)
            yield Intermediate("vote", c.branch, c.answer, c.score, {"weights": dict(tally.weights),
                                                                     "share": tally.share()})
        elif c.answer:
            yield Intermediate("below_bar", c.branch, c.answer, c.score, {"bar": bar})
