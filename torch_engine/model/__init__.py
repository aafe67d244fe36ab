"""Our own decoder code over a paged KV cache, with weights taken from a loaded Hugging Face model.

Why not transformers' model code with a paged cache hook: at batch 1 its per-layer Python and
module overhead dominates a 135M model's decode step on CPU (see docs/ARCHITECTURE.md and
docs/BENCHMARKS.md); a flat token batch through fused matmuls is several times faster.
"""

from torch_engine.model.decoder import PagedDecoder
from torch_engine.model.from_hf import decoder_from_hf
from torch_engine.model.kv_cache import KVCache

__all__ = ["KVCache", "PagedDecoder", "decoder_from_hf"]
