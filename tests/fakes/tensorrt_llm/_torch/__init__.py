"""Mirrors tensorrt_llm/_torch (the PyTorch backend); only the sampler is modelled."""
