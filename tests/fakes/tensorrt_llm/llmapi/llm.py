"""Mirrors tensorrt_llm/llmapi/llm.py @1f064c46: `LLM` (<- `_TorchLLM` <- `BaseLLM`) and `RequestOutput`.

The constructor validates kwargs as `_TorchLLM` does (anything that is not a TorchLlmArgs field raises
ValueError "The following arguments are not supported by the PyTorch backend: [...]"), then loads the
tokenizer and the Hugging Face model from `model` and starts the in-process engine
(executor/executor.py). `generate_async` prepares the caller's SamplingParams IN PLACE (end_id, pad_id,
tokenized stop words, generation_config eos ids, _stream_interval), as upstream.

Not in the real API -- test hooks:
- `live_llms()`: the LLM instances alive in this process, oldest first (an adapter builds its own).
- `LLM.last_sampling_params`: every SamplingParams generate_async received, in order (the same objects,
  after the in-place preparation); `LLM.generate_calls`: the full arguments of each call.
- `LLM.fake_step_delay_s`: seconds the engine sleeps after each iteration (to cancel mid-generation).
"""

from __future__ import annotations

import atexit
import json
import logging
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from ..executor.executor import GenerationExecutor
from ..executor.params.sampling import SamplingParams
from ..executor.result import DetokenizedGenerationResultBase, GenerationResult, IterationResult
from ..executor.utils import RequestError
from ..tokenizer import TokenizerBase, load_hf_tokenizer, tokenizer_factory
from .llm_args import TorchLlmArgs

logger = logging.getLogger("tensorrt_llm")

DEFAULT_REQUEST_PRIORITY = 0.5

_LIVE: list[weakref.ref] = []


def live_llms() -> list[LLM]:
    """Test hook: LLM instances alive (not shut down) in this process, oldest first."""
    alive = [ref() for ref in _LIVE]
    return [llm for llm in alive if llm is not None and not llm._is_shut_down()]


class RequestOutput(DetokenizedGenerationResultBase, GenerationResult):
    """The output of a request: `request_id`, `prompt` (None for token inputs), `prompt_token_ids`,
    `outputs` (one CompletionOutput per sample), `context_logits`, `finished`, `error`. Built by the LLM
    only (`__init__` raises)."""

    def __init__(self) -> None:
        raise RuntimeError(f"{self.__class__.__name__} is designed to be instantiated using "
                           f"{self.__class__.__name__}._from_generation_result by GenerationExecutor. "
                           f"Users are not expected to create {self.__class__.__name__} directly.")

    @classmethod
    def _from_generation_result(cls, generation_result: GenerationResult, prompt: str | None = None,
                                tokenizer: TokenizerBase | None = None) -> RequestOutput:
        inst = cls.__new__(cls)
        inst.__dict__.update(generation_result.__dict__)   # shares the queue the engine answers on
        inst.tokenizer = tokenizer
        inst._streaming = generation_result._streaming
        inst._prompt = prompt
        return inst

    @property
    def prompt(self) -> str | None:
        return self._prompt

    def _on_client_side_stop(self) -> None:
        # Upstream the engine keeps generating after a stop string matched on the text (nobody reads
        # it); the double frees the request instead. Not an abort: aborted() stays False.
        executor = self._executor() if self._executor is not None else None
        if executor is not None:
            executor.abort_request(self.request_id)

    def _repr_fields(self) -> list[str]:
        return ["request_id", "prompt", "prompt_token_ids", "outputs", "finished"]


def _model_kind(config: Any) -> str:
    """"causal" for *ForCausalLM; reward models as the PyTorch backend registers them: *ForRewardModel
    (outcome, one score per token) and *ForProcessRewardModel (labels per token). Hugging Face
    *ForSequenceClassification / *ForTokenClassification stand in for them (TensorRT-LLM itself would
    not load those)."""
    for arch in getattr(config, "architectures", None) or []:
        if arch.endswith(("ForProcessRewardModel", "ForTokenClassification")):
            return "token"
        if arch.endswith(("ForRewardModel", "ForSequenceClassification")):
            return "sequence"
    return "causal"


def _torch_dtype(dtype: str) -> torch.dtype:
    if dtype in ("auto", None):
        return torch.float32           # the CPU stand-in computes in float32 unless told otherwise
    value = getattr(torch, str(dtype).replace("torch.", ""), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"Unsupported dtype {dtype!r}")
    return value


class BaseLLM:
    def __init__(self, model: str | Path, tokenizer: str | Path | TokenizerBase | Any | None = None,
                 tokenizer_mode: Literal["auto", "slow"] = "auto", skip_tokenizer_init: bool = False,
                 trust_remote_code: bool = False, tensor_parallel_size: int = 1, dtype: str = "auto",
                 revision: str | None = None, tokenizer_revision: str | None = None, **kwargs: Any) -> None:
        self._executor: GenerationExecutor | None = None
        self.last_sampling_params: list[SamplingParams] = []
        self.generate_calls: list[dict[str, Any]] = []
        backend = kwargs.get("backend", None)
        if backend != "pytorch":
            raise ValueError(f"Unknown backend: {backend!r}. Supported backends are 'pytorch' and '_autodeploy'."
                             + (" (the test double runs 'pytorch' only)" if backend == "_autodeploy" else ""))
        valid_keys = set(TorchLlmArgs.model_fields) | {"_mpi_session", "backend"}
        for key in kwargs:
            if key not in valid_keys:
                raise ValueError(f"{self.__class__.__name__} got invalid argument: {key}")
        kwargs.pop("_mpi_session", None)
        self.args = TorchLlmArgs(model=str(model), tokenizer=tokenizer, tokenizer_mode=tokenizer_mode,
                                 skip_tokenizer_init=skip_tokenizer_init, trust_remote_code=trust_remote_code,
                                 tensor_parallel_size=tensor_parallel_size, dtype=dtype, revision=revision,
                                 tokenizer_revision=tokenizer_revision, **kwargs)
        self._build_model()
        _LIVE.append(weakref.ref(self))
        atexit.register(BaseLLM._shutdown_wrapper, weakref.ref(self))

    # ---- loading ------------------------------------------------------------------------------------

    def _build_model(self) -> None:
        from transformers import (
            AutoConfig,
            AutoModelForCausalLM,
            AutoModelForSequenceClassification,
            AutoModelForTokenClassification,
            GenerationConfig,
        )

        model_dir = self.args.model
        self._hf_model_config = AutoConfig.from_pretrained(model_dir, trust_remote_code=self.args.trust_remote_code)
        try:
            self._generation_config = GenerationConfig.from_pretrained(model_dir)
        except OSError:
            self._generation_config = None
        self._generation_config_explicit_values: dict[str, Any] = {}
        gen_file = Path(model_dir) / "generation_config.json"
        if self.args.generation_config == "auto" and gen_file.is_file():
            self._generation_config_explicit_values = json.loads(gen_file.read_text())
        self._tokenizer = self._try_load_tokenizer()
        kind = _model_kind(self._hf_model_config)
        loader = {"causal": AutoModelForCausalLM, "sequence": AutoModelForSequenceClassification,
                  "token": AutoModelForTokenClassification}[kind]
        model = loader.from_pretrained(model_dir, dtype=_torch_dtype(self.args.dtype),
                                       trust_remote_code=self.args.trust_remote_code)
        model.eval()
        text_config = getattr(self._hf_model_config, "text_config", None) or self._hf_model_config
        max_seq_len = self.args.max_seq_len or getattr(text_config, "max_position_embeddings", None) or 2048
        self._executor = GenerationExecutor(model, kind, self.args, max_seq_len)

    def _try_load_tokenizer(self) -> TokenizerBase | None:
        if self.args.skip_tokenizer_init:
            return None
        if self.args.tokenizer is not None:
            return tokenizer_factory(self.args.tokenizer)
        return load_hf_tokenizer(self.args.model, trust_remote_code=self.args.trust_remote_code,
                                 use_fast=self.args.tokenizer_mode != "slow")

    @property
    def tokenizer(self) -> TokenizerBase | None:
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer: TokenizerBase) -> None:
        self._tokenizer = tokenizer

    @property
    def fake_step_delay_s(self) -> float:
        """Test hook (not upstream): seconds the engine sleeps after each iteration."""
        return self._executor.step_delay_s if self._executor is not None else 0.0

    @fake_step_delay_s.setter
    def fake_step_delay_s(self, value: float) -> None:
        if self._executor is not None:
            self._executor.step_delay_s = value

    # ---- generation -----------------------------------------------------------------------------------

    def generate(self, inputs: Any, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True, lora_request: Any = None, prompt_adapter_request: Any = None,
                 kv_cache_retention_config: Any = None, disaggregated_params: Any = None,
                 scheduling_params: Any = None, conversation_params: Any = None,
                 cache_salt: str | Sequence[str] | None = None,
                 priority: float | list[float] = DEFAULT_REQUEST_PRIORITY) -> RequestOutput | list[RequestOutput]:
        """Synchronous: one prompt (str, dict, flat list[int]) -> one RequestOutput; a list -> a list."""
        unbatched = isinstance(inputs, (str, dict)) or (isinstance(inputs, list) and inputs
                                                         and isinstance(inputs[0], int))
        batch = [inputs] if unbatched else list(inputs)
        priorities = priority if isinstance(priority, list) else None
        if priorities is not None and len(priorities) != len(batch):
            raise ValueError(f"priority list length ({len(priorities)}) does not match number of prompts "
                             f"({len(batch)})")
        for p in priorities if priorities is not None else [priority]:
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"priority must be a float in [0.0, 1.0], got {p}")
        futures = [self.generate_async(item, sampling_params=self._item_at(sampling_params, i),
                                       lora_request=self._item_at(lora_request, i),
                                       prompt_adapter_request=self._item_at(prompt_adapter_request, i),
                                       kv_cache_retention_config=self._item_at(kv_cache_retention_config, i),
                                       disaggregated_params=self._item_at(disaggregated_params, i),
                                       scheduling_params=self._item_at(scheduling_params, i),
                                       conversation_params=self._item_at(conversation_params, i),
                                       cache_salt=self._item_at(cache_salt, i),
                                       priority=self._item_at(priority, i), streaming=False)
                   for i, item in enumerate(batch)]
        for future in futures:
            future.result()
        return futures[0] if unbatched else futures

    @staticmethod
    def _item_at(maybe_batched: Any, pos: int) -> Any:
        return maybe_batched[pos] if isinstance(maybe_batched, list) else maybe_batched

    def generate_async(self, inputs: Any, sampling_params: SamplingParams | None = None, lora_request: Any = None,
                       prompt_adapter_request: Any = None, streaming: bool = False,
                       kv_cache_retention_config: Any = None, disaggregated_params: Any = None,
                       trace_headers: Mapping[str, str] | None = None, _postproc_params: Any = None,
                       scheduling_params: Any = None, conversation_params: Any = None,
                       cache_salt: str | None = None, priority: float = DEFAULT_REQUEST_PRIORITY) -> RequestOutput:
        """Submit one prompt (str, list[int], {"prompt": ...} or {"prompt_token_ids": [...]}); returns at once
        a RequestOutput to await, iterate (streaming=True: one step per response) or .result()."""
        if self._executor is None or self._executor.is_shutdown():
            raise RuntimeError("LLM is shutting down")
        sampling_params = self._prepare_sampling_params(sampling_params)
        if not 0.0 <= priority <= 1.0:
            raise ValueError(f"priority must be a float in [0.0, 1.0], got {priority}")
        for name, value in (("lora_request", lora_request), ("prompt_adapter_request", prompt_adapter_request),
                            ("disaggregated_params", disaggregated_params)):
            if value is not None:
                raise NotImplementedError(f"the tensorrt_llm test double does not implement {name}")
        self._refuse_unsupported(sampling_params)
        prompt_token_ids, prompt = self._preprocess(inputs, sampling_params)
        self._check_arguments(len(prompt_token_ids), 0, sampling_params)
        self.last_sampling_params.append(sampling_params)
        self.generate_calls.append({
            "inputs": inputs, "prompt_token_ids": prompt_token_ids, "sampling_params": sampling_params,
            "streaming": streaming, "kv_cache_retention_config": kv_cache_retention_config,
            "trace_headers": trace_headers, "scheduling_params": scheduling_params,
            "conversation_params": conversation_params, "cache_salt": cache_salt, "priority": priority})
        result = self._executor.generate_async(prompt_token_ids, sampling_params=sampling_params,
                                               streaming=streaming, cache_salt=cache_salt, priority=priority)
        return RequestOutput._from_generation_result(result, prompt, self.tokenizer)

    def _prepare_sampling_params(self, sampling_params: SamplingParams | None) -> SamplingParams:
        if sampling_params is None:
            sampling_params = SamplingParams()
        if not isinstance(sampling_params, SamplingParams):
            raise TypeError(f"The sampling_params must be type SamplingParams or None, but got "
                            f"{type(sampling_params)}")
        if self.args.generation_config == "auto":
            sampling_params._apply_generation_config_defaults(self._generation_config_explicit_values)
        if sampling_params.end_id is None:
            if self.tokenizer is None:
                raise ValueError("tokenizer is required to reset end_id if it is None, or you can explicitly "
                                 "specify the end_id for sampling_params")
            sampling_params._setup(self.tokenizer, self._hf_model_config, self._generation_config)
        if sampling_params._stream_interval is None:
            sampling_params._stream_interval = self.args.stream_interval
        sampling_params.return_perf_metrics = sampling_params.return_perf_metrics or self.args.return_perf_metrics
        return sampling_params

    @staticmethod
    def _refuse_unsupported(sp: SamplingParams) -> None:
        """Real features the double does not model: refuse loudly rather than ignore them."""
        for name in ("use_beam_search", "logits_processor", "guided_decoding", "lookahead_config",
                     "additional_model_outputs", "beam_width_array", "thinking_token_budget"):
            if getattr(sp, name):
                raise NotImplementedError(f"the tensorrt_llm test double does not implement SamplingParams.{name}")

    def _preprocess(self, inputs: Any, sp: SamplingParams) -> tuple[list[int], str | None]:
        if isinstance(inputs, str):
            inputs = {"prompt": inputs}
        elif isinstance(inputs, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in inputs):
            inputs = {"prompt_token_ids": inputs}
        if not isinstance(inputs, dict) or ("prompt" not in inputs and "prompt_token_ids" not in inputs):
            raise TypeError(f"The inputs must be type str or list of int, but got {type(inputs)}")
        if "prompt_token_ids" in inputs:
            return [int(t) for t in inputs["prompt_token_ids"]], None
        if self.tokenizer is None:
            raise ValueError("A text prompt needs a tokenizer (the LLM was built with skip_tokenizer_init=True)")
        prompt = inputs["prompt"]
        ids = self.tokenizer.encode(prompt, add_special_tokens=sp.add_special_tokens)
        if sp.truncate_prompt_tokens is not None:
            ids = ids[-sp.truncate_prompt_tokens:]
        return ids, prompt

    def _check_arguments(self, prompt_len: int, query_len: int, sp: SamplingParams) -> None:
        max_num_tokens = self.args.max_num_tokens
        if not self.args.enable_chunked_prefill and max_num_tokens and prompt_len + query_len > max_num_tokens:
            raise RequestError(f"The sum of prompt length ({float(prompt_len)}), query length ({query_len}) should "
                               f"not exceed max_num_tokens ({max_num_tokens})")

    # ---- stats ----------------------------------------------------------------------------------------

    def get_stats(self, timeout: float | None = 2) -> list[dict]:
        """Iteration stats as dicts; blocks until no record arrives for `timeout` seconds. Only with
        LLM(..., enable_iter_perf_stats=True); [] before any request and once drained."""
        if self._executor is None:
            return []
        return self._executor.get_stats(timeout=timeout)

    def get_stats_async(self, timeout: float | None = 2) -> IterationResult:
        """An async iterator of the same records; StopAsyncIteration after `timeout` seconds of silence."""
        if self._executor is None:
            raise RuntimeError("LLM is shutting down")
        return self._executor.aget_stats(timeout=timeout)

    def get_kv_cache_capacity(self) -> dict:
        if self._executor is None:
            raise RuntimeError("LLM is shutting down")
        return self._executor.get_kv_cache_capacity()

    # ---- lifecycle ------------------------------------------------------------------------------------

    def _is_shut_down(self) -> bool:
        return self._executor is None

    def shutdown(self) -> None:
        if getattr(self, "_executor", None) is not None:
            self._executor.shutdown()
            self._executor = None

    def _check_health(self) -> bool:
        return self._executor is not None and self._executor.check_health()

    @staticmethod
    def _shutdown_wrapper(self_ref: weakref.ref) -> None:
        instance = self_ref()
        if instance is not None:
            instance.shutdown()

    def __enter__(self) -> BaseLLM:
        return self

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> Literal[False]:
        self.shutdown()
        return False

    def __getstate__(self) -> None:
        raise RuntimeError("LLM object can not be pickled.")

    def __del__(self) -> None:
        self.shutdown()


class _TorchLLM(BaseLLM):
    def __init__(self, model: str | Path, tokenizer: str | Path | TokenizerBase | Any | None = None,
                 tokenizer_mode: Literal["auto", "slow"] = "auto", skip_tokenizer_init: bool = False,
                 trust_remote_code: bool = False, tensor_parallel_size: int = 1, dtype: str = "auto",
                 revision: str | None = None, tokenizer_revision: str | None = None, **kwargs: Any) -> None:
        backend = kwargs.pop("backend", "pytorch")
        self._validate_args_for_torch_backend(kwargs)
        super().__init__(model, tokenizer, tokenizer_mode, skip_tokenizer_init, trust_remote_code,
                         tensor_parallel_size, dtype, revision, tokenizer_revision, backend=backend, **kwargs)

    def _validate_args_for_torch_backend(self, kwargs: dict) -> None:
        fields = set(TorchLlmArgs.model_fields)
        unsupported = [key for key in kwargs if key not in fields and key not in ("_mpi_session", "backend")]
        if unsupported:
            raise ValueError(f"The following arguments are not supported by the PyTorch backend: {unsupported}.")


class LLM(_TorchLLM):
    """LLM class is the main class for running a LLM model (PyTorch backend). See TorchLlmArgs."""

    def __init__(self, model: str | Path, tokenizer: str | Path | TokenizerBase | Any | None = None,
                 tokenizer_mode: Literal["auto", "slow"] = "auto", skip_tokenizer_init: bool = False,
                 trust_remote_code: bool = False, tensor_parallel_size: int = 1, dtype: str = "auto",
                 revision: str | None = None, tokenizer_revision: str | None = None, **kwargs: Any) -> None:
        super().__init__(model, tokenizer, tokenizer_mode, skip_tokenizer_init, trust_remote_code,
                         tensor_parallel_size, dtype, revision, tokenizer_revision, **kwargs)
