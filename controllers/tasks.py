"""What controllers yield (tasks and events) and what comes back, as plain dataclasses."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from controllers.base import Controller, Result


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class Prompt:
    """Exactly one of text, messages or token_ids."""

    text: str | None = None
    messages: tuple[Message, ...] | None = None
    token_ids: tuple[int, ...] | None = None
    continue_final_message: bool = False


# TaskFailure.reason of a task whose text does not fit the model's context (the worker contract's
# TaskError.reason). When the controller wrote that text itself, the branch has only grown as far as it can.
CONTEXT_LENGTH_EXCEEDED = "CONTEXT_LENGTH_EXCEEDED"


@dataclass(frozen=True)
class TaskFailure:
    """Why a task produced no result. code is a gRPC status name such as 'UNAVAILABLE'."""

    code: str
    message: str
    field: str = ""
    reason: str = ""    # machine-readable cause, e.g. CONTEXT_LENGTH_EXCEEDED

    @property
    def context_full(self) -> bool:
        return self.reason == CONTEXT_LENGTH_EXCEEDED


@dataclass
class SampleOut:
    index: int
    text: str
    finish_reason: str            # "stop" | "length" | "cancelled"
    token_count: int
    cumulative_logprob: float = 0.0
    token_logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[float]] = field(default_factory=list)  # per token, when sampling.logprobs > 0
    stop_reason: str = ""         # the stop string that ended it ("" for EOS, a stop token or another reason)


@dataclass
class TokenDelta:
    """New tokens of one sample of a running task, as a runner reports them."""

    index: int
    text: str
    token_count: int
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[float]] = field(default_factory=list)


@dataclass
class Trace:
    """A sample while it is generated: what Generate.stop_when sees after every delta."""

    index: int
    text: str = ""
    token_count: int = 0
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[float]] = field(default_factory=list)

    def add(self, delta: TokenDelta) -> None:
        self.text += delta.text
        self.token_count += delta.token_count
        self.logprobs.extend(delta.logprobs)
        self.top_logprobs.extend(delta.top_logprobs)

    def sample(self, finish_reason: str) -> SampleOut:
        return SampleOut(self.index, self.text, finish_reason, self.token_count, sum(self.logprobs),
                         list(self.logprobs), list(self.top_logprobs))


@dataclass
class GenerateOutput:
    samples: list[SampleOut]
    prompt_tokens: int
    completion_tokens: int
    worker_id: str = ""
    handles: list[str] = field(default_factory=list)   # per sample, when the task set keep_s
    cached_prompt_tokens: int = 0


@dataclass
class Generate:
    """Sample `n` continuations of `prompt`. The runtime fills exactly one of `output` and `failure`.

    `sampling` overrides the run's sampling parameters for this task (e.g. {"temperature": 0}).
    `branch` names the branch in streamed events, e.g. "sample"; sample i streams as "sample/i".
    `keep_s` > 0 asks the worker to keep each finished sample (KV included) that long; the output's
    `handles` name them. A later task with `continue_from` (uses the handle up) or `fork_from`
    (leaves it) starts from that sample on the same worker, appending `prompt.text` (may be empty)
    without prefilling the sample again.

    `stop_when(trace)` is called after every delta of every sample; when it returns True the task is
    cancelled on the worker (its KV freed at the next step) and completes with the samples so far,
    finish_reason "cancelled" and `stopped_early` set. It stops the whole task: give each trace that
    may be stopped on its own a task of its own (n=1). `traces` shows the samples while they run.
    """

    prompt: Prompt
    n: int = 1
    sampling: dict[str, Any] = field(default_factory=dict)
    branch: str = "main"
    keep_s: float = 0.0
    continue_from: str = ""
    fork_from: str = ""
    stop_when: Callable[[Trace], bool] | None = None
    output: GenerateOutput | None = None
    failure: TaskFailure | None = None
    stopped_early: bool = False
    traces: dict[int, Trace] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.output is not None

    @property
    def done(self) -> bool:
        return self.output is not None or self.failure is not None


@dataclass
class ScoreOutput:
    scores: list[float]                                         # per candidate
    step_scores: list[list[float]] = field(default_factory=list)  # process reward: per candidate, per step
    worker_id: str = ""


@dataclass
class Score:
    """Score candidate answers to `prompt`: kind "outcome" (a reward model, one score each),
    "process" (a process reward model, a score per step ending at `step_separator`, aggregate = min)
    or "verifier" (the generation model asked whether the answer is right, score = P(yes)).
    `model` picks the reward model's pool; empty = any worker that can score this kind."""

    prompt: Prompt
    candidates: list[str]
    kind: str = "outcome"
    step_separator: str = ""
    model: str = ""
    output: ScoreOutput | None = None
    failure: TaskFailure | None = None

    @property
    def ok(self) -> bool:
        return self.output is not None

    @property
    def done(self) -> bool:
        return self.output is not None or self.failure is not None


@dataclass
class Branch:
    """Run another controller as a parallel branch of this one (e.g. majority vote over Dynasor
    generations). Its token deltas stream under `name/...`; its Result lands in `result`, or its
    failure in `failure`."""

    controller: Controller
    prompt: Prompt
    name: str = "branch"
    result: Result | None = None
    failure: TaskFailure | None = None

    @property
    def ok(self) -> bool:
        return self.result is not None

    @property
    def done(self) -> bool:
        return self.result is not None or self.failure is not None


Task = Generate | Score | Branch


@dataclass
class WaitAny:
    """Yield to start these tasks (those not yet started) and resume as soon as any of them is done,
    with the list of those done so far. The others keep running."""

    tasks: list[Task]


@dataclass
class Cancel:
    """Yield to cancel running tasks; resumes once they have settled (a cancelled Generate completes
    with its samples so far and finish_reason "cancelled"). Tasks already done are left as they are."""

    tasks: list[Task]


@dataclass
class Progress:
    """Yield one to stream a progress event; the controller resumes at once."""

    stage: str
    message: str = ""
    done: int = 0
    total: int = 0


@dataclass
class Intermediate:
    """Yield one to stream an intermediate result (a vote, a score, a pruned branch)."""

    kind: str
    branch: str = ""
    answer: str = ""
    value: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Candidate:
    branch: str
    text: str
    answer: str = ""
    score: float = 0.0
    finish_reason: str = ""
