"""What controllers yield (tasks and events) and what comes back, as plain dataclasses."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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


@dataclass(frozen=True)
class TaskFailure:
    """Why a task produced no result. code is a gRPC status name such as 'UNAVAILABLE'."""

    code: str
    message: str
    field: str = ""


@dataclass
class SampleOut:
    index: int
    text: str
    finish_reason: str            # "stop" | "length" | "cancelled"
    token_count: int
    cumulative_logprob: float = 0.0
    token_logprobs: list[float] = field(default_factory=list)


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
    """

    prompt: Prompt
    n: int = 1
    sampling: dict[str, Any] = field(default_factory=dict)
    branch: str = "main"
    keep_s: float = 0.0
    continue_from: str = ""
    fork_from: str = ""
    output: GenerateOutput | None = None
    failure: TaskFailure | None = None

    @property
    def ok(self) -> bool:
        return self.output is not None


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
