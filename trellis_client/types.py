"""What the client hands back: plain dataclasses, not protobuf messages, so callers need no generated code.

A run's stream is a sequence of events (`Started`, `Progress`, `Delta`, `Intermediate`, then `Final` with the
`Result`); in a Session a run may end in `Failed` instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0      # every token the method generated, across all its branches
    cached_prompt_tokens: int = 0   # prompt tokens a worker served from its KV prefix cache
    tasks: int = 0                  # worker tasks behind the result


@dataclass(frozen=True)
class Timings:
    queue_ms: float = 0.0           # admission wait in the router
    ttft_ms: float = 0.0            # first token of any branch
    total_ms: float = 0.0


@dataclass(frozen=True)
class Candidate:
    branch: str
    text: str
    answer: str
    score: float
    finish_reason: str              # "stop", "length", "cancelled", "error" or ""


@dataclass(frozen=True)
class Result:
    run_id: str
    controller: str
    answer: str                     # the controller's final answer
    text: str                       # the text behind it (e.g. the winning sample)
    candidates: list[Candidate]
    details: dict[str, Any]         # controller-specific, e.g. {"votes": {...}, "share": 0.75}
    usage: Usage
    timings: Timings


@dataclass(frozen=True)
class Started:
    run_id: str
    elapsed_ms: float
    controller: str
    params: dict[str, Any]          # after the controller's defaults were applied


@dataclass(frozen=True)
class Progress:
    run_id: str
    elapsed_ms: float
    stage: str
    message: str
    tasks_done: int
    tasks_total: int


@dataclass(frozen=True)
class Delta:
    """New text of one branch; branch names are paths such as "sample/3" or "beam/2/step/1"."""
    run_id: str
    elapsed_ms: float
    branch: str
    text: str
    token_count: int


@dataclass(frozen=True)
class Intermediate:
    """A result inside the run: a vote, a score, a pruned branch..."""
    run_id: str
    elapsed_ms: float
    kind: str
    branch: str
    answer: str
    value: float
    details: dict[str, Any]


@dataclass(frozen=True)
class Final:
    run_id: str
    elapsed_ms: float
    result: Result


@dataclass(frozen=True)
class Failed:
    """A run of a Session that ended in an error (the session itself goes on)."""
    run_id: str
    elapsed_ms: float
    error: Exception                # a TrellisError


Event = Started | Progress | Delta | Intermediate | Final | Failed


@dataclass(frozen=True)
class ParamInfo:
    name: str
    type: str                       # "int", "float", "str", "bool"
    description: str
    default: Any
    minimum: float | None = None
    maximum: float | None = None
    choices: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ControllerInfo:
    name: str
    description: str
    params: list[ParamInfo]


@dataclass(frozen=True)
class Catalog:
    """What the router offers: its controllers and the models its workers serve now."""
    controllers: list[ControllerInfo]
    models: list[str]

    def controller(self, name: str) -> ControllerInfo | None:
        return next((c for c in self.controllers if c.name == name), None)


@dataclass(frozen=True)
class TopLogprob:
    token_id: int
    logprob: float
    token: str


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[TopLogprob]


@dataclass(frozen=True)
class Completion:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str
    stop_reason: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    cumulative_logprob: float = 0.0


@dataclass(frozen=True)
class Generation:
    """A plain generate call's answer: n completions of one prompt from one worker."""
    completions: list[Completion]
    usage: Usage
    timings: Timings
    model_id: str
    worker_id: str


@dataclass(frozen=True)
class CandidateScore:
    index: int
    score: float                    # outcome/verifier score, or the process score's aggregate (min over steps)
    step_scores: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class Scores:
    scores: list[CandidateScore]
    usage: Usage
    model_id: str
    worker_id: str
