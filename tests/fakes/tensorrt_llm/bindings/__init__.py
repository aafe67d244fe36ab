"""Mirrors the C++ bindings package tensorrt_llm.bindings (only the executor pieces the LLM API uses)."""
