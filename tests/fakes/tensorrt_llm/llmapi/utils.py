"""Mirrors tensorrt_llm/llmapi/utils.py (AsyncQueue; defined in executor/utils.py to avoid an import cycle)."""

from ..executor.utils import AsyncQueue

__all__ = ["AsyncQueue"]
