"""A sequence being generated, and the request (n samples of one prompt) it belongs to."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from torch_engine.block_manager import BlockTable
from torch_engine.detokenizer import IncrementalDetokenizer
from trellis_rpc.sampling import SamplingConfig, derive_seed
from worker_runtime.engine_api import RunInfo, SequenceSource, TokenLogprob
from worker_runtime.stop_strings import StopStringMatcher


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    """One generate task. Its first sequence prefills the prompt; at the first sampled token it forks
    into n sequences that share the prompt's blocks."""

    task_id: str
    prompt_ids: list[int]
    cfg: SamplingConfig
    emit: Callable[[object], None]
    submitted: float
    sequences: list[Sequence] = field(default_factory=list)
    started: float = 0.0
    first_token: float = 0.0
    cancelled: bool = False
    forked: bool = False
    cached_prompt_tokens: int = 0
    done: bool = False
    source: SequenceSource | None = None
    appended: list[int] = field(default_factory=list)   # tokens to add to the source sequence
    context: list[int] = field(default_factory=list)    # the end of the source sequence, for the detokenizers
    keep_ttl_s: float | None = None
    handles: dict[int, str] = field(default_factory=dict)
    prefill_batch_size: int = 0
    decode_steps: int = 0
    decode_batch_sum: int = 0
    last_step: int = -1
    run: RunInfo | None = None                 # the run the task belongs to, for scheduling by run

    def generator(self, index: int) -> torch.Generator | None:
        """One generator per sample, so a seeded request reproduces whatever else is in the batch."""
        if self.cfg.seed is None:
            return None
        return torch.Generator().manual_seed(derive_seed(self.cfg.seed, index))


@dataclass
class Sequence:
    request: Request
    index: int
    token_ids: list[int]
    num_prompt: int
    detok: IncrementalDetokenizer
    stops: StopStringMatcher
    generator: torch.Generator | None
    status: Status = Status.WAITING
    computed: int = 0                       # tokens whose K/V are in the cache
    table: BlockTable = field(default_factory=BlockTable)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    finish_reason: str = ""

    @property
    def generated(self) -> int:
        return len(self.token_ids) - self.num_prompt

    @property
    def pending(self) -> int:
        """Tokens to run through the model before this sequence can sample again."""
        return len(self.token_ids) - self.computed
