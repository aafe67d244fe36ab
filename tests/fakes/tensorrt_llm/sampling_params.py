"""The <=1.2.x import path (tensorrt_llm/sampling_params.py, e.g. at 1.2.0rc2 b35ac1b6); at the mirrored
commit the class lives in tensorrt_llm/executor/params/sampling.py."""

from .executor.params.sampling import GuidedDecodingParams, LogitsProcessor, LogprobMode, SamplingParams

__all__ = ["GuidedDecodingParams", "LogitsProcessor", "LogprobMode", "SamplingParams"]
