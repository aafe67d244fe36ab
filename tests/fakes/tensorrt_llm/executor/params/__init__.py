"""Mirrors tensorrt_llm/executor/params/ (the request parameter classes since the layout migration)."""

from .sampling import GuidedDecodingParams, LogitsProcessor, LogprobMode, SamplingParams

__all__ = ["GuidedDecodingParams", "LogitsProcessor", "LogprobMode", "SamplingParams"]
