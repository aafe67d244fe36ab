"""A scripted TaskRunner for controller tests: deterministic outputs chosen by the test, streamed token by
token (one word = one token) so concurrency, early stops and cancellation are really exercised."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from controllers import Generate, GenerateOutput, Prompt, SampleOut, Score, ScoreOutput, TaskFailure, TokenDelta
from controllers.runtime import TaskFailed, drive


@dataclass
class Script:
    """What one sample says: its words, and optionally a logprob and top-k logprobs per word."""

    text: str
    logprobs: list[float] | None = None
    top_logprobs: list[list[float]] | None = None
    finish_reason: str = "stop"
    stop_reason: str = ""


Responder = Callable[[Generate, int], "Script | str | TaskFailure"]
Scorer = Callable[[Score], "list[float] | list[list[float]] | TaskFailure"]


def _words(text: str) -> list[str]:
    """Split keeping the separators, so the pieces join back to text exactly."""
    pieces, current = [], ""
    for ch in text:
        current += ch
        if ch == " " or ch == "\n":
            pieces.append(current)
            current = ""
    if current:
        pieces.append(current)
    return pieces


@dataclass
class ScriptedRunner:
    """respond(task, index) gives sample `index` of a generate task: a Script, a plain text, or a
    TaskFailure (the whole task fails). score(task) gives one float per candidate (outcome, verifier)
    or a list of step scores per candidate (process), or a TaskFailure."""

    respond: Responder
    score_fn: Scorer | None = None
    tick_s: float = 0.0                      # pause between tokens (0 still yields to the event loop)
    generated: list[Generate] = field(default_factory=list)
    scored: list[Score] = field(default_factory=list)
    cancelled: list[Generate] = field(default_factory=list)
    tokens_streamed: int = 0

    async def generate(self, task: Generate, on_token) -> GenerateOutput:
        self.generated.append(task)
        scripts = []
        for i in range(task.n):
            got = self.respond(task, i)
            if isinstance(got, TaskFailure):
                raise TaskFailed(got)
            scripts.append(Script(got) if isinstance(got, str) else got)
        words = [_words(s.text) for s in scripts]
        try:
            for step in range(max((len(w) for w in words), default=0)):
                await asyncio.sleep(self.tick_s)
                for i, (script, pieces) in enumerate(zip(scripts, words, strict=True)):
                    if step < len(pieces):
                        lp = [script.logprobs[step]] if script.logprobs else []
                        top = [script.top_logprobs[step]] if script.top_logprobs else []
                        self.tokens_streamed += 1
                        last = step == len(pieces) - 1   # a real worker marks a sample's last delta
                        on_token(TokenDelta(i, pieces[step], 1, lp, top, script.finish_reason if last else ""))
        except asyncio.CancelledError:
            self.cancelled.append(task)
            raise
        except BaseException:
            self.cancelled.append(task)  # the controller stopped reading (early stop)
            raise
        samples = [SampleOut(i, s.text, s.finish_reason, len(w), sum(s.logprobs or []), list(s.logprobs or []),
                             list(s.top_logprobs or []), s.stop_reason)
                   for i, (s, w) in enumerate(zip(scripts, words, strict=True))]
        return GenerateOutput(samples=samples, prompt_tokens=len(_words(task.prompt.text or "")),
                              completion_tokens=sum(len(w) for w in words), worker_id="scripted")

    async def score(self, task: Score) -> ScoreOutput:
        self.scored.append(task)
        if self.score_fn is None:
            raise TaskFailed(TaskFailure("UNAVAILABLE", "no scorer in this script"))
        await asyncio.sleep(self.tick_s)
        got = self.score_fn(task)
        if isinstance(got, TaskFailure):
            raise TaskFailed(got)
        if task.kind == "process":
            return ScoreOutput(scores=[min(steps) if steps else 0.0 for steps in got], step_scores=got)
        return ScoreOutput(scores=list(got))


@dataclass
class Recorded:
    result: object
    events: list
    deltas: list[tuple[str, str]]


def run_controller(controller, runner, prompt: str | Prompt = "q") -> Recorded:
    events: list = []
    deltas: list[tuple[str, str]] = []
    prompt = Prompt(text=prompt) if isinstance(prompt, str) else prompt
    result = asyncio.run(drive(controller, prompt, runner, events.append,
                               lambda branch, text, count: deltas.append((branch, text))))
    return Recorded(result, events, deltas)
