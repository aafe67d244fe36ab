"""What the worker service needs from an engine (CPU torch, TensorRT-LLM, ...), in plain dataclasses.

The worker service owns the wire (protobuf, streams, cancellation bookkeeping); an engine owns the
model. Engines raise trellis_rpc.errors.StatusError for requests they cannot serve.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from trellis_rpc.sampling import SamplingConfig
from trellis_rpc.scoring import DEFAULT_STEP_SEPARATOR


@dataclass
class PromptInput:
    """Exactly one of text, chat or token_ids is set."""

    text: str | None = None
    chat: list[dict[str, str]] | None = None
    continue_final_message: bool = False
    token_ids: list[int] | None = None


@dataclass
class SequenceSource:
    """Start from a sequence an earlier task kept (KV included): continue it (the handle is used up)
    or fork it (the kept sequence stays for more forks)."""

    handle: str
    fork: bool = False


@dataclass(frozen=True)
class RunInfo:
    """The run a task belongs to (the router's RunContext): a worker schedules runs, not tasks."""

    run_id: str
    priority: int = 0
    tokens: int = 0           # tokens the run had consumed, on any worker, when the task was sent
    tasks_done: int = 0


@dataclass
class TopLogprob:
    token_id: int
    logprob: float
    token: str


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[TopLogprob] = field(default_factory=list)


@dataclass
class Delta:
    """New tokens of sample `index`; text holds back anything that could still become a stop string."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str = ""       # set on a sample's last delta: "stop" | "length" | "cancelled"


@dataclass
class CompletionOut:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length" | "cancelled"
    stop_reason: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    cumulative_logprob: float = 0.0


@dataclass
class Finished:
    completions: list[CompletionOut]
    prompt_tokens: int
    cached_prompt_tokens: int
    queue_ms: float
    ttft_ms: float
    latency_ms: float
    handles: list[str] = field(default_factory=list)  # per completion, when the task asked to keep them
    prefill_batch_size: int = 0       # sequences in the engine step that produced the first token
    decode_steps: int = 0             # engine steps that decoded this task's sequences after the first token
    decode_batch_mean: float = 0.0    # sequences per step, averaged over those steps


@dataclass
class LoadStats:
    queue_depth: int
    running_sequences: int
    kv_blocks_used: int
    kv_blocks_free: int
    kept_sequences: int = 0
    waiting_runs: int = 0      # distinct runs among the waiting tasks (an engine that schedules by run)
    paused_sequences: int = 0  # running sequences left out of the last step for better-ranked runs


@dataclass
class EngineInfo:
    model_id: str
    engine: str
    max_context_tokens: int
    max_batch_size: int
    kv_block_size: int = 0
    kv_blocks_total: int = 0
    eos_token: str = ""
    keeps_sequences: bool = False   # continue/fork of kept sequences, and a prefix cache
    scheduling: str = "fcfs"        # the order it gives waiting work ("run_las": by run), a label on its metrics


class Engine(Protocol):
    info: EngineInfo

    def generate(self, task_id: str, prompt: PromptInput, sampling: SamplingConfig,
                 source: SequenceSource | None = None, keep_ttl_s: float | None = None,
                 run: RunInfo | None = None) -> AsyncIterator[Delta | Finished]:
        """Yield deltas as tokens are produced, then exactly one Finished. Raise StatusError on bad input.
        source: start from a kept sequence; keep_ttl_s: keep the finished sequences under handles; run: the
        task's run, for an engine that schedules by run (others may ignore it)."""
        ...

    def cancel(self, task_id: str) -> None:
        """Stop the task at the next step and free its state; its iterator ends with a Finished."""
        ...

    # An engine with info.keeps_sequences also has release(task_prefix: str) -> None: drop the sequences
    # kept by tasks whose id starts with task_prefix + "/" and free their KV now rather than at their TTL.

    def load(self) -> LoadStats: ...


# ---- scoring (reward models and verifiers) -------------------------------------------------------

SCORE_KINDS = ("outcome", "process", "verifier")


@dataclass
class ScoreInput:
    """One score task: every candidate is scored against the same prompt, together in one batch.
    prompt holds text or chat (token ids are rejected before a scorer sees them)."""

    prompt: PromptInput
    candidates: list[str]
    kind: str                                     # one of SCORE_KINDS
    step_separator: str = DEFAULT_STEP_SEPARATOR  # process: where one reasoning step ends
    run: RunInfo | None = None                    # the run the task belongs to (a scorer may order by it)


@dataclass
class CandidateScoreOut:
    index: int
    score: float                                  # process: the minimum over step_scores
    step_scores: list[float] = field(default_factory=list)


@dataclass
class ScoreOut:
    scores: list[CandidateScoreOut]               # in candidate order
    prompt_tokens: int                            # tokens run through the model, all candidates together
    queue_ms: float
    latency_ms: float


@dataclass
class ScorerInfo:
    model_id: str
    kinds: tuple[str, ...]                        # subset of SCORE_KINDS
    engine: str
    max_context_tokens: int                       # per candidate (prompt + candidate); 0 = no known limit
    max_candidates: int
    eos_token: str = ""


class Scorer(Protocol):
    """Scores candidates with a reward model or a verifier; runs the model off the event loop."""

    info: ScorerInfo

    async def score(self, task_id: str, request: ScoreInput) -> ScoreOut:
        """Raise StatusError for requests the model cannot take (e.g. a candidate longer than the context)."""
        ...

    def load(self) -> LoadStats:
        """queue_depth: tasks waiting; running_sequences: candidates in the batch being scored."""
        ...
