"""Mirrors tensorrt_llm/executor/__init__.py (the names the LLM API and its users import from here)."""

from .executor import GenerationExecutor
from .params.sampling import SamplingParams
from .result import (
                     CompletionOutput,
                     DetokenizedGenerationResultBase,
                     GenerationResult,
                     GenerationResultBase,
                     IterationResult,
                     Logprob,
)
from .utils import RequestError

__all__ = ["CompletionOutput", "DetokenizedGenerationResultBase", "GenerationExecutor", "GenerationResult",
           "GenerationResultBase", "IterationResult", "Logprob", "RequestError", "SamplingParams"]
