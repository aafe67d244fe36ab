"""The paged KV cache: one preallocated tensor holding K and V of every layer, indexed by slot
(block * block_size + offset). Sequences own blocks through their block tables.

Layout [layer, 2 (K, V), kv_head, slot, head_dim]: per layer, K and V of every head are one run of
[2 * kv_head * blocks] block-sized rows, so a single index_select gathers a batch's whole context as
[2 * kv_head, batch, context, head_dim], contiguous, which batched matmuls consume without a copy."""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        slots = num_blocks * block_size
        self.kv = torch.zeros(num_layers, 2, num_kv_heads, slots, head_dim, dtype=dtype)
        self.k = self.kv[:, 0]
        self.v = self.kv[:, 1]

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def block_rows(self, layer: int) -> torch.Tensor:
        """Layer's cache as [2 * kv_head * num_blocks, block_size * head_dim]: row (s * num_blocks + b)
        is block b of stream s (K of each head, then V of each head)."""
        return self.kv[layer].view(2 * self.num_kv_heads * self.num_blocks, self.block_size * self.head_dim)

    def gather_index(self, blocks: torch.Tensor) -> torch.Tensor:
        """Rows of block_rows() holding `blocks` ([..., nb]) for every K and V head, flattened in
        [2 * kv_head, ...blocks] order. Computed once per step, used by every layer."""
        streams = torch.arange(2 * self.num_kv_heads) * self.num_blocks
        return (streams.view(-1, *[1] * blocks.dim()) + blocks).reshape(-1)

    def copy_block(self, src: int, dst: int, tokens: int) -> None:
        """Copy-on-write for a shared partial block: the first `tokens` slots of src into dst."""
        bs = self.block_size
        s, d = src * bs, dst * bs
        self.kv[..., d:d + tokens, :] = self.kv[..., s:s + tokens, :]
