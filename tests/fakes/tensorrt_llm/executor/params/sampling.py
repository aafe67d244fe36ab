"""Mirrors tensorrt_llm/executor/params/sampling.py @1f064c46: SamplingParams with every field, default,
`__post_init__`, the newest `_validate`, the greedy predicates and `_setup` (which the LLM calls to fill
end_id / pad_id and tokenize `stop` / `bad`)."""

from __future__ import annotations

import enum
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

MAX_TOP_LOGPROBS = 100

# Fields `generation_config='auto'` may fill from the model's generation_config.json when a request left
# them None.
_GENERATION_CONFIG_SAMPLING_FIELDS = frozenset({
    "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "length_penalty", "early_stopping",
    "no_repeat_ngram_size"})


class LogprobMode(enum.StrEnum):
    """'raw': logprobs of the model's logits; 'processed': after penalties, temperature and masks."""

    RAW = "raw"
    PROCESSED = "processed"


class LogitsProcessor(ABC):
    """Per-request logits hook (accepted by the real API; the test double refuses to run one)."""

    @abstractmethod
    def __call__(self, req_id: int, logits: torch.Tensor, token_ids: list[list[int]], stream_ptr: int | None,
                 client_id: int | None) -> None: ...


@dataclass(slots=True, kw_only=True)
class GuidedDecodingParams:
    json: str | dict | Any | None = None
    regex: str | None = None
    grammar: str | None = None
    json_object: bool = False
    structural_tag: str | None = None

    def _validate(self) -> None:
        guides = [self.json is not None, self.regex is not None, self.grammar is not None, self.json_object,
                  self.structural_tag is not None]
        if sum(guides) > 1:
            raise ValueError(f"Only one guide can be used for a request, but got {sum(guides)}.")


def check_logprobs_limit(name: str, value: int | None) -> None:
    if value is not None and not 0 <= value <= MAX_TOP_LOGPROBS:
        raise ValueError(f"{name} must be in [0, {MAX_TOP_LOGPROBS}], got {name}={value}")


def validate_thinking_token_budget(budget: int | None) -> int | None:
    if budget is None or budget == -1:
        return None
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
        raise ValueError(f"thinking_token_budget must be a non-negative int, -1 or None, got {budget!r}")
    return budget


@dataclass(slots=True, kw_only=True)
class SamplingParams:
    """Sampling parameters for one request. Keyword-only; unknown or positional arguments raise TypeError."""

    end_id: int | None = None
    pad_id: int | None = None
    max_tokens: int = 32
    bad: str | list[str] | None = None
    bad_token_ids: list[int] | None = None
    _bad_word_ids: list[list[int]] | None = field(default=None, init=False, repr=False)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    _stop_word_ids: list[list[int]] | None = field(default=None, init=False, repr=False)

    embedding_bias: torch.Tensor | None = None
    logits_processor: LogitsProcessor | list[LogitsProcessor] | None = None
    apply_batched_logits_processor: bool = False

    n: int = 1
    best_of: int | None = None
    use_beam_search: bool = False
    logprobs_mode: LogprobMode = LogprobMode.RAW

    top_k: int | None = None
    top_p: float | None = None
    top_p_min: float | None = None
    top_p_reset_ids: int | None = None
    top_p_decay: float | None = None
    seed: int | None = None
    temperature: float | None = None
    min_tokens: int | None = None
    beam_search_diversity_rate: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    prompt_ignore_length: int | None = None
    length_penalty: float | None = None
    early_stopping: int | None = None
    no_repeat_ngram_size: int | None = None
    min_p: float | None = None
    beam_width_array: list[int] | None = None

    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logprobs_simple_format: bool = False
    prompt_logprobs_simple_format: bool = False
    return_context_logits: bool = False
    return_generation_logits: bool = False
    exclude_input_from_output: bool = True
    return_encoder_output: bool = False
    return_perf_metrics: bool = False
    additional_model_outputs: list[str] | None = None

    _decoder_output_token_prefix: tuple[int, ...] = field(default_factory=tuple, init=False, repr=False)
    _context_logits_auto_enabled: bool = False
    _generation_logits_auto_enabled: bool = False
    _return_log_probs: bool = False

    lookahead_config: Any | None = None
    guided_decoding: GuidedDecodingParams | None = None
    thinking_token_budget: int | None = None

    ignore_eos: bool = False
    detokenize: bool = True
    add_special_tokens: bool = True
    truncate_prompt_tokens: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    # Set by the LLM from llm.args.stream_interval (the caller's object is mutated, as in the real API).
    _stream_interval: int | None = field(default=None, init=False, repr=False)
    _request_provided_fields: frozenset[str] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.pad_id is None:
            self.pad_id = self.end_id
        self.best_of = self.best_of or self.n
        if self.embedding_bias is not None:
            if isinstance(self.embedding_bias, torch.Tensor):
                self.embedding_bias = self.embedding_bias.detach().clone()
            else:
                self.embedding_bias = torch.tensor(self.embedding_bias, dtype=torch.float32)
        self._validate()

    def _validate(self) -> None:
        # Negated range checks, as upstream, so that NaN is rejected too.
        if self.top_p is not None and not 0 <= self.top_p <= 1:
            raise ValueError(f"require 0 <= top_p <= 1, got top_p={self.top_p}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"require top_k >= 0, got top_k={self.top_k}")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise ValueError(f"require 0 <= min_p <= 1, got min_p={self.min_p}")
        if self.temperature is not None and not self.temperature >= 0:
            raise ValueError(f"require temperature >= 0, got temperature={self.temperature}")
        if self.top_p_decay is not None and not 0.0 < self.top_p_decay <= 1.0:
            raise ValueError(f"require 0 < top_p_decay <= 1, got top_p_decay={self.top_p_decay}")
        if self.top_p_min is not None and not 0.0 < self.top_p_min <= 1.0:
            raise ValueError(f"require 0 < top_p_min <= 1, got top_p_min={self.top_p_min}")
        if self.top_p_reset_ids is not None and self.top_p_reset_ids < 0:
            raise ValueError(f"require top_p_reset_ids >= 0, got top_p_reset_ids={self.top_p_reset_ids}")
        if self.best_of is not None and self.best_of < self.n:
            raise ValueError(f"best_of ({self.best_of}) cannot be less than n ({self.n})")
        if (self.best_of is not None and self.best_of > 1 and self._greedy_decoding
                and not os.environ.get("TLLM_ALLOW_N_GREEDY_DECODING", None)):
            raise ValueError(
                f"Greedy decoding in the LLM API does not allow multiple returns. Please set to best_of=1, "
                f"got best_of={self.best_of}. Please set to best_of=1 or set an environment variable "
                f"TLLM_ALLOW_N_GREEDY_DECODING=1 to allow best_of > 1 under the greedy decoding.")
        self.logprobs_mode = LogprobMode(self.logprobs_mode)
        if self.truncate_prompt_tokens is not None and self.truncate_prompt_tokens < 1:
            raise ValueError(f"truncate_prompt_tokens must be >= 1, got {self.truncate_prompt_tokens}")
        if self.guided_decoding is not None:
            self.guided_decoding._validate()
        self.thinking_token_budget = validate_thinking_token_budget(self.thinking_token_budget)
        # logprobs=True means "the sampled token only" (0), False means none.
        if self.logprobs is False:
            self.logprobs = None
        if self.logprobs is True:
            self.logprobs = 0
        check_logprobs_limit("logprobs", self.logprobs)
        check_logprobs_limit("prompt_logprobs", self.prompt_logprobs)
        if self.logprobs_simple_format and self.logprobs != 0:
            raise ValueError(f"logprobs_simple_format=True requires logprobs == 0, got logprobs={self.logprobs}")
        if self.prompt_logprobs_simple_format and self.prompt_logprobs != 0:
            raise ValueError("prompt_logprobs_simple_format=True requires prompt_logprobs == 0, got "
                             f"prompt_logprobs={self.prompt_logprobs}")
        if self.logprobs_simple_format and self.use_beam_search:
            raise ValueError("logprobs_simple_format is not supported with beam search")

    def _set_request_provided_fields(self, field_names: Iterable[str]) -> None:
        self._request_provided_fields = frozenset(field_names) & _GENERATION_CONFIG_SAMPLING_FIELDS

    def _apply_generation_config_defaults(self, generation_config: Mapping[str, Any]) -> None:
        """generation_config='auto': model defaults for the sampling fields the request left unset."""
        for name in _GENERATION_CONFIG_SAMPLING_FIELDS:
            if name not in generation_config:
                continue
            if self._request_provided_fields is None:
                provided = getattr(self, name) is not None
            else:
                provided = name in self._request_provided_fields
            value = generation_config[name]
            if provided or value is None:
                continue
            if name == "early_stopping" and not isinstance(value, (bool, int)):
                continue
            setattr(self, name, value)
        self._validate()

    @staticmethod
    def params_imply_top_p_decay_active(top_p_decay: float | None) -> bool:
        return top_p_decay is not None and top_p_decay < 1.0

    @staticmethod
    def params_imply_explicit_greedy(*, temperature: float | None, top_p: float | None, top_k: int | None,
                                     min_p: float | None) -> bool:
        return top_k == 1 or top_p == 0.0 or min_p == 1.0 or temperature == 0

    @staticmethod
    def params_imply_greedy_decoding(*, temperature: float | None, top_p: float | None, top_k: int | None,
                                     use_beam_search: bool | None, min_p: float | None = None,
                                     top_p_decay: float | None = None) -> bool:
        if use_beam_search:
            return False
        if SamplingParams.params_imply_explicit_greedy(temperature=temperature, top_p=top_p, top_k=top_k,
                                                       min_p=min_p):
            return True
        implicitly_greedy = temperature is None and top_p is None and top_k is None
        min_p_active = min_p is not None and min_p > 0.0
        decay_active = SamplingParams.params_imply_top_p_decay_active(top_p_decay)
        return implicitly_greedy and not min_p_active and not decay_active

    @property
    def _greedy_decoding(self) -> bool:
        return self.params_imply_greedy_decoding(
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, use_beam_search=self.use_beam_search,
            min_p=self.min_p, top_p_decay=self.top_p_decay)

    @property
    def _need_return_context_logits(self) -> bool:
        return self.return_context_logits and not self._context_logits_auto_enabled

    @property
    def _need_return_generation_logits(self) -> bool:
        return self.return_generation_logits and not self._generation_logits_auto_enabled

    def _setup(self, tokenizer: Any, hf_model_config: Any, generation_config: Any,
               add_special_tokens: bool = False) -> SamplingParams:
        """Fill end_id / pad_id from the tokenizer, tokenize `stop` and `bad`, and append the model's
        generation_config eos ids (other than end_id) to stop_token_ids -- all on this object."""
        if self.end_id is None:
            self.end_id = tokenizer.eos_token_id
            self.pad_id = tokenizer.pad_token_id
            if self.pad_id is None:
                self.pad_id = self.end_id

        def _encode(text: str) -> list[int]:
            try:
                return tokenizer.encode(text, add_special_tokens=add_special_tokens)
            except TypeError:
                return tokenizer.encode(text)

        if self.bad is not None:
            strs = [self.bad] if isinstance(self.bad, str) else self.bad
            self._bad_word_ids = [_encode(s) for s in strs]
        if self.stop is not None:
            strs = [self.stop] if isinstance(self.stop, str) else self.stop
            self._stop_word_ids = [_encode(s) for s in strs]
        if generation_config is not None and generation_config.eos_token_id is not None:
            if isinstance(generation_config.eos_token_id, int):
                generation_config.eos_token_id = [generation_config.eos_token_id]
            if not self.stop_token_ids:
                self.stop_token_ids = []
            for stop_token in generation_config.eos_token_id:
                if stop_token != self.end_id and stop_token not in self.stop_token_ids:
                    self.stop_token_ids.append(stop_token)
            if not self.stop_token_ids:
                self.stop_token_ids = None
        return self

    def _get_bad_words(self) -> list[list[int]]:
        words = [[i] for i in self.bad_token_ids] if self.bad_token_ids else []
        if self.bad is None:
            return words
        if self._bad_word_ids is None:
            raise RuntimeError(f"{self.__class__.__name__}.bad ({self.bad}) is not processed by tokenizer, "
                               "please call the setup method.")
        return words + self._bad_word_ids

    def _get_stop_words(self) -> list[list[int]]:
        words = [[i] for i in self.stop_token_ids] if self.stop_token_ids else []
        if self.stop is None:
            return words
        if self._stop_word_ids is None:
            raise RuntimeError(f"{self.__class__.__name__}.stop ({self.stop}) is not processed by tokenizer, "
                               "please call the setup method.")
        return words + self._stop_word_ids

    def _get_stop_reasons_and_words(self) -> list[tuple[int | str, list[int]]]:
        reasons: list[int | str] = []
        if self.stop_token_ids is not None:
            reasons.extend(self.stop_token_ids)
        if self.stop is not None:
            reasons.extend([self.stop] if isinstance(self.stop, str) else self.stop)
        return list(zip(reasons, self._get_stop_words(), strict=False))
