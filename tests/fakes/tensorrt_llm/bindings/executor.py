"""The C++ executor objects the LLM API reads (tensorrt_llm.bindings.executor: FinishReason, Result,
Response), as plain Python. Only the fields result.py consumes are kept."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class FinishReason(enum.IntEnum):
    NOT_FINISHED = 0
    END_ID = 1
    STOP_WORDS = 2
    LENGTH = 3
    TIMED_OUT = 4
    CANCELLED = 5


@dataclass
class Result:
    """One response's payload for ONE sequence (sequence_index) of a request, as the PyTorch backend
    sends it: with n > 1 (no beam search) every sample answers in its own response."""

    is_final: bool                          # the whole request is done
    sequence_index: int
    output_token_ids: list[list[int]]       # [beam][new tokens since this sequence's previous response]
    finish_reasons: list[FinishReason]
    is_sequence_final: bool = False
    cum_log_probs: list[float] | None = None
    log_probs: list[list[Any]] | None = None            # [beam][new TokenLogprobs entries]
    context_logits: Any = None                          # torch.Tensor [prompt_len, vocab]
    generation_logits: Any = None                       # torch.Tensor [beam, generated, vocab]
    prompt_logprobs: list[Any] | None = None            # what the worker computes into LogProbsResult.prompt
    decoding_iter: int = 0
    cached_tokens: int = 0                               # prompt tokens found in reused KV blocks


@dataclass
class Response:
    request_id: int
    result: Result | None = None
    error_msg: str | None = None
    extra: dict = field(default_factory=dict)

    def has_error(self) -> bool:
        return self.error_msg is not None
