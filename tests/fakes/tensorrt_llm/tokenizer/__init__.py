"""Mirrors tensorrt_llm/tokenizer/ (where the tokenizer moved; llmapi/tokenizer.py re-exports it)."""

from .tokenizer import TokenizerBase, TransformersTokenizer, load_hf_tokenizer, tokenizer_factory

__all__ = ["TokenizerBase", "TransformersTokenizer", "load_hf_tokenizer", "tokenizer_factory"]
