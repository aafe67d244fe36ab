"""Mirrors the tensorrt_llm/llmapi/tokenizer.py backward-compatibility shim."""

from ..tokenizer import TokenizerBase, TransformersTokenizer, load_hf_tokenizer, tokenizer_factory

__all__ = ["TokenizerBase", "TransformersTokenizer", "load_hf_tokenizer", "tokenizer_factory"]
