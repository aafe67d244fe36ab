"""A TEST DOUBLE of NVIDIA TensorRT-LLM's Python LLM API -- not TensorRT-LLM.

Mirrors TensorRT-LLM 1.3.0rc24 (the source read is commit 1f064c467a211b4168555ca06bb9b801c64eae20,
release 1.3.0rc2x; 1.2.x differences are kept where they change an import path). Every public name,
signature, default, validation rule and result object below follows the real one; the work behind them
is a Hugging Face model (AutoModelForCausalLM + AutoTokenizer from the `model` directory) run on the CPU
token by token, on a background thread, so tests see real generation semantics without a GPU.

Which real file each module mirrors (paths relative to the real `tensorrt_llm/` package):

- `__init__.py`, `version.py`            -> `__init__.py`, `version.py` (`__version__`, `LLM`, `SamplingParams`)
- `llmapi/__init__.py`                   -> `llmapi/__init__.py`
- `llmapi/llm.py`                        -> `llmapi/llm.py` (`LLM` <- `_TorchLLM` <- `BaseLLM`, `RequestOutput`)
- `llmapi/llm_args.py`                   -> `llmapi/llm_args.py` (`KvCacheConfig`, `SchedulerConfig`, `TorchLlmArgs`)
- `llmapi/tokenizer.py`, `tokenizer/`    -> the `llmapi/tokenizer.py` shim and `tokenizer/tokenizer.py`
                                            (`TransformersTokenizer`, `tokenizer_factory`)
- `executor/params/sampling.py`          -> `executor/params/sampling.py` (`SamplingParams`, `GuidedDecodingParams`)
- `sampling_params.py`                   -> `sampling_params.py` (the <=1.2.x import path, re-exporting the above)
- `executor/result.py`                   -> `executor/result.py` (`Logprob`, `CompletionOutput`,
                                            `GenerationResultBase`, `DetokenizedGenerationResultBase`,
                                            `GenerationResult`, `IterationResult`)
- `executor/utils.py`, `llmapi/utils.py` -> `executor/utils.py` (`RequestError`) and `llmapi/utils.py`
                                            (`AsyncQueue`: one queue with sync and async ends)
- `executor/executor.py`                 -> `executor/executor.py` (`GenerationExecutor`); here it IS the engine:
                                            scheduler, KV-block bookkeeping and iteration stats, in process
- `_torch/pyexecutor/sampler.py`         -> `_torch/pyexecutor/sampler.py` (`TorchSampler`: logits processing,
                                            sampling, top-K logprobs, stop criteria)
- `bindings/executor.py`                 -> the C++ bindings' `FinishReason`, `Result`, `Response`

Where the double knowingly differs: dtype "auto" computes in float32; KV blocks are bookkeeping only
(capacity = KvCacheConfig.max_tokens, or free_gpu_memory_fraction x 65536 tokens); beam search, logits
processors, guided/lookahead decoding, LoRA, prompt adapters, disaggregated serving and parallelism raise
NotImplementedError / ValueError instead of running; aborting a still-queued request and shutting down
with requests in flight both answer finish_reason 'cancelled' (upstream: unverified / may hang); a stop
string matched on the text frees the request (upstream keeps generating unread); HF
*ForSequenceClassification / *ForTokenClassification load as reward models besides *ForRewardModel /
*ForProcessRewardModel. The response-level quirks that ARE mirrored are listed in executor/result.py.

Test hooks that the real package does not have (all documented where defined):
`tensorrt_llm.llmapi.llm.live_llms()`, `LLM.last_sampling_params`, `LLM.generate_calls`,
`LLM.fake_step_delay_s`.
"""

from .executor.params.sampling import SamplingParams
from .llmapi.llm import LLM
from .version import __version__

__all__ = ["LLM", "SamplingParams", "__version__"]
