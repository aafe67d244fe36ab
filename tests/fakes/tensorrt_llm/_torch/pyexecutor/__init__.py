"""Mirrors tensorrt_llm/_torch/pyexecutor."""
