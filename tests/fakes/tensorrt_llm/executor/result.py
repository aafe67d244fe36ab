"""Mirrors tensorrt_llm/executor/result.py @1f064c46: Logprob, CompletionOutput and the result classes.

The response handling is ported from the real `_handle_sequence` / `_handle_response`, quirks included:

- A response carries ONE sequence (`sequence_index`). It resets `_last_token_ids_len` /
  `_last_logprobs_len` of that output only, so with n > 1 the other outputs keep their previous
  `token_ids_diff` / `logprobs_diff` (stale) on that yield. `_last_text_len` is reset on every output, and
  in streaming mode each output's text is re-decoded incrementally from its `token_ids_diff`, so a stale
  diff is decoded again (text repeats: upstream PR #9802 "Fix output corruption when enable n>1 and
  streaming" was closed; the mirrored commit still has this code). With n == 1 every diff is exact.
- Stop words (stop_token_ids, tokenized `stop`) are stripped from `token_ids` at the end (unless
  include_stop_str_in_output); `logprobs` keep the stripped tokens' entries. END_ID never appears.
- A `stop` string found in the detokenized text truncates `text`, sets finish_reason 'stop' /
  stop_reason and marks the request done on the client side (token_ids are not truncated then).
"""

from __future__ import annotations

import json
import time
import weakref
from dataclasses import dataclass, field
from queue import Empty
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

import torch

from ..bindings.executor import FinishReason, Response
from .params.sampling import SamplingParams
from .utils import AsyncQueue, EngineDeadError, RequestError

if TYPE_CHECKING:
    from .executor import GenerationExecutor

__all__ = ["CompletionOutput", "DetokenizedGenerationResultBase", "GenerationResult", "GenerationResultBase",
           "IterationResult", "Logprob", "SimpleTokenLogprobs", "TokenLogprobs"]


@dataclass(slots=True)
class Logprob:
    """Holds logprob and vocab rank for a token."""

    logprob: float
    rank: int | None = None


# One {token_id: Logprob} per position: the top K (rank 1..K) plus the sampled token if it is not among them.
TokenLogprobs: TypeAlias = list[dict[int, Logprob]]
SimpleTokenLogprobs: TypeAlias = list[float]


@dataclass(slots=True)
class CompletionOutput:
    """One output sequence of a request. `text` / `token_ids` are cumulative; the *_diff properties hold
    what the latest response added."""

    index: int
    text: str = ""
    token_ids: list[int] | None = field(default_factory=list)
    cumulative_logprob: float | None = None
    logprobs: TokenLogprobs | SimpleTokenLogprobs | None = field(default_factory=list)
    prompt_logprobs: TokenLogprobs | SimpleTokenLogprobs | None = field(default_factory=list)
    finish_reason: Literal["stop", "length", "timeout", "cancelled"] | None = None
    stop_reason: int | str | None = None
    generation_logits: torch.Tensor | None = None
    additional_context_outputs: dict[str, torch.Tensor] | None = None
    additional_generation_outputs: dict[str, torch.Tensor] | None = None
    disaggregated_params: Any | None = None
    request_perf_metrics: Any | None = None

    _last_text_len: int = field(default=0, init=False, repr=False)
    _last_token_ids_len: int = field(default=0, init=False, repr=False)
    _last_logprobs_len: int = field(default=0, init=False, repr=False)
    _incremental_states: dict | None = field(default=None, init=False, repr=False)
    _postprocess_result: Any = None

    @property
    def length(self) -> int:
        return len(self.token_ids)

    @property
    def text_diff(self) -> str:
        return self.text[self._last_text_len:]

    @property
    def token_ids_diff(self) -> list[int]:
        return self.token_ids[self._last_token_ids_len:]

    @property
    def logprobs_diff(self) -> TokenLogprobs | SimpleTokenLogprobs:
        return self.logprobs[self._last_logprobs_len:]


class GenerationResultBase:
    """The core of a request's result: outputs, finish reasons, abort flag."""

    def __init__(self, id: int, sampling_params: SamplingParams) -> None:
        self.id = id
        self.sampling_params = sampling_params
        self._error_msg: str | None = None
        self._disaggregated_params = None
        self.decoding_iter = 0
        self.cached_tokens = 0
        self._done = False
        self._terminal_error: BaseException | None = None
        self._aborted = False
        self.metrics_dict: dict = {}
        self.trace_headers: dict[str, str] | None = None
        self.use_trtllm_sampler = sampling_params.use_beam_search and sampling_params.best_of > 1
        # One queue, read synchronously (result()) or asynchronously (async for / await).
        self.aqueue = AsyncQueue()
        self.queue = self.aqueue.sync_q
        # best_of sequences run; `outputs` returns the n best by cumulative logprob when best_of > n.
        self._outputs: list[CompletionOutput] = [CompletionOutput(i) for i in range(sampling_params.best_of)]
        self._context_logits: torch.Tensor | None = None

    def abort(self) -> None:
        self._aborted = True

    def aborted(self) -> bool:
        return self._aborted

    @property
    def outputs(self) -> list[CompletionOutput]:
        sp = self.sampling_params
        if sp.use_beam_search or sp.n == sp.best_of:
            return self._outputs[:sp.n]
        ranked = sorted(self._outputs, reverse=True,
                        key=lambda x: x.cumulative_logprob if x.cumulative_logprob is not None else float("-inf"))
        for i, out in enumerate(ranked):
            out.index = i
        return ranked[:sp.n]

    @property
    def context_logits(self) -> torch.Tensor | None:
        return self._context_logits

    @property
    def disaggregated_params(self) -> Any:
        return self._disaggregated_params

    @property
    def error(self) -> str | None:
        return self._error_msg

    def _handle_sequence(self, finish_reasons: list[FinishReason], result: Any, sequence_index: int) -> None:
        output = self._outputs[sequence_index]
        output._last_token_ids_len = len(output.token_ids)
        output._last_logprobs_len = len(output.logprobs)
        output.token_ids.extend(result.output_token_ids[0])
        if result.cum_log_probs is not None:
            output.cumulative_logprob = result.cum_log_probs[0]
        if result.prompt_logprobs is not None:
            output.prompt_logprobs = result.prompt_logprobs
        if result.log_probs is not None:
            output.logprobs += result.log_probs[0]
        if result.generation_logits is not None:
            output.generation_logits = result.generation_logits[0, :output.length]
        reason = finish_reasons[0]
        if reason == FinishReason.CANCELLED:
            output.finish_reason = "cancelled"
        finished = (reason != FinishReason.NOT_FINISHED and reason != FinishReason.CANCELLED) or self._done
        if not finished:
            return
        if reason == FinishReason.END_ID:
            output.finish_reason = "stop"
        elif reason == FinishReason.STOP_WORDS:
            output.finish_reason = "stop"
            for stop_reason, stop_ids in self.sampling_params._get_stop_reasons_and_words():
                if output.token_ids[-len(stop_ids):] == stop_ids:
                    output.stop_reason = stop_reason
                    if not self.sampling_params.include_stop_str_in_output:
                        output.token_ids = output.token_ids[:-len(stop_ids)]
                    break
        elif reason == FinishReason.LENGTH:
            output.finish_reason = "length"
        elif reason == FinishReason.TIMED_OUT:
            output.finish_reason = "timeout"

    def _handle_response(self, response: Response) -> None:
        if response.has_error():
            self._error_msg = response.error_msg
            self._done = True
            return
        result = response.result
        self._done = result.is_final
        self.decoding_iter = result.decoding_iter
        self.cached_tokens = result.cached_tokens
        self._handle_sequence(result.finish_reasons, result, result.sequence_index)
        if result.context_logits is not None:
            self._context_logits = result.context_logits


class DetokenizedGenerationResultBase(GenerationResultBase):
    """Adds detokenization (incremental when streaming) and stop strings matched on the text."""

    def __init__(self, id: int, sampling_params: SamplingParams, tokenizer: Any = None,
                 streaming: bool = False) -> None:
        super().__init__(id, sampling_params)
        self.tokenizer = tokenizer
        self._streaming = streaming

    def _handle_response(self, response: Response) -> None:
        GenerationResultBase._handle_response(self, response)
        if response.has_error():
            return
        sp = self.sampling_params
        kwargs = {"skip_special_tokens": sp.skip_special_tokens,
                  "spaces_between_special_tokens": sp.spaces_between_special_tokens}
        if not sp.detokenize or self.tokenizer is None:
            return
        for beam_output in self.outputs:
            beam_output._last_text_len = len(beam_output.text)
            if hasattr(self.tokenizer, "decode_incrementally") and self._streaming and not sp.use_beam_search:
                beam_output.text, beam_output._incremental_states = self.tokenizer.decode_incrementally(
                    beam_output.token_ids_diff, prev_text=beam_output.text, states=beam_output._incremental_states,
                    flush=self._done, stream_interval=sp._stream_interval or 1, **kwargs)
            else:
                beam_output.text = self.tokenizer.decode(beam_output.token_ids, **kwargs)
            is_generating = not self._done
            if is_generating or beam_output.finish_reason in ("stop", "length"):
                for stop_reason, _ in sp._get_stop_reasons_and_words():
                    if isinstance(stop_reason, str) and stop_reason in beam_output.text:
                        stop_pos = beam_output.text.find(stop_reason)
                        if not sp.include_stop_str_in_output:
                            beam_output.text = beam_output.text[:stop_pos]
                        else:
                            beam_output.text = beam_output.text[:stop_pos + len(stop_reason)]
                        beam_output.finish_reason = "stop"
                        beam_output.stop_reason = stop_reason
                        self._done = True
                        self._on_client_side_stop()
                        break

    def _on_client_side_stop(self) -> None:
        """Hook: the real engine keeps generating after a text-level stop; the double frees it instead."""


class GenerationResult(GenerationResultBase):
    """A request's result: awaitable, sync- and async-iterable (each step returns self), abortable."""

    def __init__(self, request_id: int, prompt_token_ids: list[int], sampling_params: SamplingParams,
                 streaming: bool, executor: GenerationExecutor | None = None) -> None:
        super().__init__(request_id, sampling_params)
        self._request_id = request_id
        self._prompt_token_ids = prompt_token_ids
        self._streaming = streaming
        self._executor = weakref.ref(executor) if executor is not None else None

    @property
    def request_id(self) -> int:
        return self._request_id

    @property
    def prompt_token_ids(self) -> list[int]:
        return self._prompt_token_ids

    def abort(self) -> None:
        """Cancel the request: the engine stops it at its next iteration and answers once more with
        finish_reason 'cancelled' on every unfinished output (finished=True)."""
        assert self._executor is not None, "The executor is not set for this result."
        executor = self._executor()
        if executor is not None:
            executor.abort_request(self.request_id)
        super().abort()

    @property
    def finished(self) -> bool:
        return self._done

    def _consume(self, response: Any) -> None:
        if isinstance(response, EngineDeadError):
            self._terminal_error = response
            self._done = True
            raise response
        self._handle_response(response)
        if self._error_msg is not None:
            # The real result hands error responses to the executor's background error handler,
            # which raises RequestError in the caller.
            raise RequestError(self._error_msg)

    def _result_step(self, timeout: float | None = None) -> None:
        self._consume(self.queue.get(timeout=timeout))

    async def _aresult_step(self) -> None:
        self._consume(await self.aqueue.get())

    def result(self, timeout: float | None = None) -> GenerationResult:
        """Block until done (TimeoutError after `timeout` seconds in total) and return self."""
        if self._terminal_error is not None:
            raise self._terminal_error
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._done:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                self._result_step(remaining)
            except Empty:
                raise TimeoutError(f"Request {self.request_id} did not complete within {timeout} seconds.") from None
        return self

    async def aresult(self) -> GenerationResult:
        if self._terminal_error is not None:
            raise self._terminal_error
        while not self._done:
            await self._aresult_step()
        return self

    def __await__(self):
        return self.aresult().__await__()

    def __iter__(self):
        return self

    def __next__(self) -> GenerationResult:
        if self._terminal_error is not None:
            raise self._terminal_error
        if self._done:
            raise StopIteration
        self._result_step()
        return self

    def __aiter__(self):
        return self

    async def __anext__(self) -> GenerationResult:
        if self._terminal_error is not None:
            raise self._terminal_error
        if self._done:
            raise StopAsyncIteration
        await self._aresult_step()
        return self

    def _repr_fields(self) -> list[str]:
        return ["request_id", "prompt_token_ids", "outputs", "finished", "context_logits"]

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._repr_fields())
        return f"{self.__class__.__name__}({fields})"

    def __hash__(self) -> int:
        return hash(self.request_id)


class IterationResult:
    """Iteration statistics: each item is one JSON record. `get_results()` drains until `timeout` seconds
    pass without a record; then (and after an async timeout) it stays done, returning nothing, until new
    requests are submitted (`mark_undone`)."""

    def __init__(self) -> None:
        self._done = False
        self._timeout: float | None = 2
        self.aqueue = AsyncQueue()
        self.queue = self.aqueue.sync_q

    def set_timeout(self, timeout: float | None) -> None:
        self._timeout = timeout

    def mark_undone(self) -> None:
        self._done = False

    def get_results(self) -> list[dict]:
        results = []
        while not self._done:
            try:
                results.append(json.loads(self.queue.get(timeout=self._timeout)))
            except Empty:
                self._done = True
        return results

    def __aiter__(self):
        return self

    async def __anext__(self) -> dict:
        if self._done:
            raise StopAsyncIteration
        try:
            return json.loads(await self.aqueue.get(timeout=self._timeout))
        except TimeoutError:
            self._done = True
            raise StopAsyncIteration from None
