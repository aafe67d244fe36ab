"""The paged KV cache: one preallocated tensor per layer for K and for V, indexed by slot
(block * block_size + offset). Sequences own blocks through their block tables.

Layout [layer, kv_head, slot, head_dim]: gathering a sequence's blocks per head then yields
[kv_head, batch, context, head_dim] contiguously, which batched matmuls consume without a copy."""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        slots = num_blocks * block_size
        self.k = torch.zeros(num_layers, num_kv_heads, slots, head_dim, dtype=dtype)
        self.v = torch.zeros(num_layers, num_kv_heads, slots, head_dim, dtype=dtype)

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def copy_block(self, src: int, dst: int, tokens: int) -> None:
        """Copy-on-write for a shared partial block: the first `tokens` slots of src into dst."""
        bs = self.block_size
        s, d = src * bs, dst * bs
        self.k[:, :, d:d + tokens] = self.k[:, :, s:s + tokens]
        self.v[:, :, d:d + tokens] = self.v[:, :, s:s + tokens]
