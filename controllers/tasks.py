"""What controllers yield (tasks and events) and what comes back, as plain dataclasses."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

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

    def continued(self, text: str, token_ids: Sequence[int] | None = None) -> Prompt:
        """This prompt followed by what the model wrote so far, for a model to go on from there: `text`, or
        for a token-id prompt `token_ids` (the same output as ids; such a prompt cannot take text).

        A chat whose final message is left open (continue_final_message) gets that message extended,
        whatever its role: the model's output continued exactly that message. Otherwise the text becomes a
        new assistant message, left open. Nothing to add leaves the prompt as it is.
        """
        if self.token_ids is not None:
            if token_ids is None and text:
                raise ValueError("prompt: cannot continue a token-id prompt with text; send a text or chat prompt")
            return Prompt(token_ids=(*self.token_ids, *token_ids)) if token_ids else self
        if not text:
            return self
        if self.messages is None:
            return Prompt(text=(self.text or "") + text)
        if self.continue_final_message and self.messages:
            last = self.messages[-1]
            messages = (*self.messages[:-1], Message(last.role, last.content + text))
        else:
            messages = (*self.messages, Message("assistant", text))
        return Prompt(messages=messages, continue_final_message=True)


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
    finish_reason: str = ""       # set on a sample's last delta, when the runner knows it ("stop" | "length")


@dataclass
class Trace:
    """A sample while it is generated: what Generate.stop_when sees after every delta."""

    index: int
    text: str = ""
    token_count: int = 0
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[float]] = field(default_factory=list)
    finish_reason: str = ""       # the sample is complete once set: it will produce no more tokens

    def add(self, delta: TokenDelta) -> None:
        self.text += delta.text
        self.token_count += delta.token_count
        self.logprobs.extend(delta.logprobs)
        self.top_logprobs.extend(delta.top_logprobs)
        self.finish_reason = delta.finish_reason or self.finish_reason

    def sample(self, finish_reason: str) -> SampleOut:
        return SampleOut(self.index, self.text, finish_reason, self.token_count, sum(self.logprobs),
                         list(self.logprobs), list(self.top_logprobs))


class Settles:
    """A task the runtime settles with exactly one of a result (`outcome` names its field) or a failure."""

    outcome: ClassVar[str] = "output"
    failure: TaskFailure | None

    @property
    def ok(self) -> bool:
        return getattr(self, self.outcome) is not None

    @property
    def done(self) -> bool:
        return self.ok or self.failure is not None


@dataclass
class GenerateOutput:
    samples: list[SampleOut]
    prompt_tokens: int
    completion_tokens: int
    worker_id: str = ""
    handles: list[str] = field(default_factory=list)   # per sample, when the task set keep_s
    cached_prompt_tokens: int = 0


@dataclass
class Generate(Settles):
    """Sample `n` continuations of `prompt`. The runtime fills exactly one of `output` and `failure`.

    `sampling` overrides the run's sampling parameters for this task (e.g. {"temperature": 0}).
    `branch` names the branch in streamed events, e.g. "sample"; sample i streams as "sample/i".
    `keep_s` > 0 asks the worker to keep each finished sample (KV included) that long; the output's
    `handles` name them. A later task with `continue_from` (uses the handle up) or `fork_from`
    (leaves it) starts from that sample on the same worker, appending `prompt.text` (may be empty)
    without prefilling the sample again.

    `stop_when(trace)` is called after every delta of every sample; when it returns True the task is
    cancelled on the worker (its KV freed at the next step) and completes with the samples so far,
    `stopped_early` set; the samples that had not finished have finish_reason "cancelled". It stops the whole
    task: give each trace that may be stopped on its own a task of its own (n=1). `traces` shows the samples
    while they run.
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


@dataclass
class ScoreOutput:
    scores: list[float]                                         # per candidate
    step_scores: list[list[float]] = field(default_factory=list)  # process reward: per candidate, per step
    worker_id: str = ""


@dataclass
class Score(Settles):
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


@dataclass
class Branch(Settles):
    """Run another controller as a parallel branch of this one (e.g. majority vote over Dynasor
    generations). Its token deltas stream under `name/...`; its Result lands in `result`, or its
    failure in `failure`."""

    outcome: ClassVar[str] = "result"

    controller: Controller
    prompt: Prompt
    name: str = "branch"
    result: Result | None = None
    failure: TaskFailure | None = None


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
