"""Mirrors tensorrt_llm/llmapi/__init__.py (the subset Trellis uses)."""

from ..executor import CompletionOutput, RequestError
from ..executor.params.sampling import GuidedDecodingParams, SamplingParams
from .llm import LLM, RequestOutput
from .llm_args import CapacitySchedulerPolicy, KvCacheConfig, SchedulerConfig, TorchLlmArgs
from .tokenizer import TokenizerBase, TransformersTokenizer

__all__ = ["LLM", "CapacitySchedulerPolicy", "CompletionOutput", "GuidedDecodingParams", "KvCacheConfig",
           "RequestError", "RequestOutput", "SamplingParams", "SchedulerConfig", "TokenizerBase",
           "TorchLlmArgs", "TransformersTokenizer"]
