"""A decoder-only transformer over a flat batch of tokens from many sequences.

Every linear layer runs once on all the step's tokens ([T, hidden]); only attention is per
sequence: the decode tokens of all sequences in one padded SDPA call over K/V gathered from their
blocks, each prefill chunk in its own causal SDPA call over its context.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from torch_engine.model.kv_cache import KVCache
from torch_engine.model.quant import Int8Weight, QuantWeight, linear

if TYPE_CHECKING:
    from torch_engine.model.compiled_decode import CompiledDecode


@dataclass
class LayerWeights:
    norm1: torch.Tensor
    norm1_bias: torch.Tensor | None
    qkv: torch.Tensor | QuantWeight     # [(H + 2 * Hkv) * D, hidden]
    qkv_bias: torch.Tensor | None
    out: torch.Tensor | QuantWeight     # [hidden, H * D]
    out_bias: torch.Tensor | None
    norm2: torch.Tensor
    norm2_bias: torch.Tensor | None
    up: torch.Tensor | QuantWeight      # gated: [2 * I, hidden] (gate then up); plain: [I, hidden]
    up_bias: torch.Tensor | None
    down: torch.Tensor | QuantWeight    # [hidden, I]
    down_bias: torch.Tensor | None


@dataclass
class DecoderSpec:
    arch: str
    num_layers: int
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab: int
    max_positions: int
    norm: str                           # "rms" | "layer"
    eps: float
    act: str                            # "silu" | "gelu_tanh" | "gelu"
    gated_mlp: bool
    rope: bool


@dataclass
class DecoderWeights:
    spec: DecoderSpec
    embed: torch.Tensor                 # [vocab, hidden]
    pos_embed: torch.Tensor | None      # learned positions (GPT-2)
    layers: list[LayerWeights]
    final_norm: torch.Tensor
    final_norm_bias: torch.Tensor | None
    lm_head: torch.Tensor | QuantWeight # [vocab, hidden]
    lm_head_bias: torch.Tensor | None = None
    rope_cos: torch.Tensor | None = None  # [max_positions, head_dim], float32
    rope_sin: torch.Tensor | None = None


@dataclass
class PrefillChunk:
    start: int                          # offset of the chunk's tokens in the flat batch
    length: int
    context_blocks: torch.Tensor | None  # [blocks] the KV blocks it attends to (cached + chunk); None: the
    mask: torch.Tensor | None            # chunk is its whole context. mask: [length, blocks * block_size] bool


@dataclass
class StepInput:
    input_ids: torch.Tensor             # [T]
    positions: torch.Tensor             # [T]
    slot_mapping: torch.Tensor          # [T] where each token's K/V is written
    num_decode: int                     # the first num_decode tokens are single-token decodes
    decode_blocks: torch.Tensor | None  # [num_decode, max_blocks] block tables, padded with block 0
    decode_mask: torch.Tensor | None    # [num_decode, 1, 1, max_blocks * block_size] bool
    decode_lengths: torch.Tensor | None  # [num_decode] context length of each decode, its new token included
    prefills: list[PrefillChunk] = field(default_factory=list)
    logits_rows: torch.Tensor | None = None  # rows of the flat batch whose next-token logits are needed


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def norm(spec: DecoderSpec, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The model's norm (eager here, traced by compiled_decode.py)."""
    if spec.norm == "layer":
        return F.layer_norm(x, (x.shape[-1],), weight, bias, spec.eps)
    # RMSNorm in float32, as the reference implementations do, then back to the compute dtype.
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=spec.eps).to(x.dtype)


def activation(spec: DecoderSpec, x: torch.Tensor) -> torch.Tensor:
    if spec.act == "silu":
        return F.silu(x)
    return F.gelu(x, approximate="tanh" if spec.act == "gelu_tanh" else "none")


@dataclass
class _Context:
    """The K/V a group of queries attends to, gathered once per layer: rows of KVCache.block_rows()
    (index from KVCache.gather_index) copied into `out`, allocated once per step and reused by every
    layer (a fresh multi-MB tensor per layer costs page faults that made the gather 10x slower).
    Block-sized rows of a 2-D view in one index_select: measured ~16x faster in float32 than an
    index_select along the slot dimension (a strided kernel)."""
    index: torch.Tensor
    out: torch.Tensor                   # [2 * Hkv * rows, block_size * D]
    shape: tuple[int, ...]              # of the gathered K (and V): [Hkv, ..., context, D]

    @classmethod
    def of(cls, kv: KVCache, blocks: torch.Tensor) -> _Context:
        index = kv.gather_index(blocks)
        out = torch.empty(index.numel(), kv.block_size * kv.head_dim, dtype=kv.kv.dtype)
        shape = (kv.num_kv_heads, *blocks.shape[:-1], blocks.shape[-1] * kv.block_size, kv.head_dim)
        return cls(index, out, shape)

    def gather(self, kv: KVCache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        torch.index_select(kv.block_rows(layer), 0, self.index, out=self.out)
        both = self.out.view(2, *self.shape)
        return both[0], both[1]


class PagedDecoder:
    def __init__(self, weights: DecoderWeights, dtype: torch.dtype) -> None:
        self.w = weights
        self.spec = weights.spec
        self.dtype = dtype
        self.scale = self.spec.head_dim ** -0.5
        self.group = self.spec.num_heads // self.spec.num_kv_heads
        self.compiled: CompiledDecode | None = None  # set by the engine when it compiles the decode step

    def _softmax_attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        mask: torch.Tensor | None) -> torch.Tensor:
        """q [..., m, D] against k, v [..., L, D]; mask broadcastable to [..., m, L] (True = attend).
        Plain batched matmuls with a float32 softmax: on this CPU torch's fused SDPA is ~5x slower in
        bfloat16 and needs copies of the gathered K/V in either dtype (docs/ARCHITECTURE.md)."""
        scores = torch.matmul(q, k.transpose(-1, -2))
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores * self.scale, dim=-1, dtype=torch.float32)
        return torch.matmul(probs.to(q.dtype), v)

    def _decode_attention(self, q: torch.Tensor, kv: KVCache, layer: int, step: StepInput,
                          context: _Context) -> torch.Tensor:
        """q [B, H, D] of one token per sequence -> [B, H, D]."""
        B, H, D = q.shape
        hkv = kv.num_kv_heads
        keys, values = context.gather(kv, layer)                            # [Hkv, B, L, D]
        qg = q.view(B, hkv, self.group, D).transpose(0, 1)                 # [Hkv, B, G, D]
        mask = step.decode_mask.view(1, B, 1, -1)
        out = self._softmax_attend(qg, keys, values, mask)                 # [Hkv, B, G, D]
        return out.transpose(0, 1).reshape(B, H, D)

    def _prefill_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: KVCache, layer: int,
                           chunk: PrefillChunk, context: _Context | None) -> torch.Tensor:
        """q [n, H, D] of one sequence's chunk -> [n, H, D], causal over its cached context and itself."""
        n, H, D = q.shape
        hkv = kv.num_kv_heads
        if context is None:                                                # the chunk is the whole context
            keys, values = k.transpose(0, 1), v.transpose(0, 1)            # [Hkv, n, D]
            if self.dtype == torch.float32:
                o = F.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0), keys.unsqueeze(0),
                                                   values.unsqueeze(0), is_causal=True, enable_gqa=hkv != H)
                return o[0].transpose(0, 1)
            mask = torch.ones(n, n, dtype=torch.bool).tril()
        else:
            keys, values = context.gather(kv, layer)                       # [Hkv, L, D]
            mask = chunk.mask
        qg = q.view(n, hkv, self.group, D).permute(1, 2, 0, 3)             # [Hkv, G, n, D]
        out = self._softmax_attend(qg, keys.unsqueeze(1), values.unsqueeze(1), mask)  # [Hkv, G, n, D]
        return out.permute(2, 0, 1, 3).reshape(n, H, D)

    def _linear(self, x: torch.Tensor, w: torch.Tensor | QuantWeight, bias: torch.Tensor | None) -> torch.Tensor:
        if self.compiled is not None and isinstance(w, Int8Weight):
            # Compiled, the activation quantization fuses into a pass or two instead of a dozen (prefill:
            # 2.6x faster at 512 rows of SmolLM2's MLP).
            return self.compiled.int8_linear(x, w.q, w.scales, bias)
        return linear(x, w, bias)

    def forward(self, step: StepInput, kv: KVCache) -> torch.Tensor:
        """Run the step's tokens through the model, writing their K/V; return float32 logits of logits_rows."""
        if self.compiled is None or not step.num_decode:
            return self._forward_eager(step, kv)
        # Decode rows always take the compiled graph, even beside prefill chunks, so that a sequence's
        # logits do not depend on what else its step holds; the chunks run eagerly after them.
        nd = step.num_decode
        logits = self.compiled.forward(step.input_ids[:nd], step.positions[:nd], step.slot_mapping[:nd],
                                       step.decode_blocks, step.decode_lengths, kv)
        if not step.prefills:
            return logits
        rest = StepInput(step.input_ids[nd:], step.positions[nd:], step.slot_mapping[nd:], 0, None, None, None,
                         [replace(chunk, start=chunk.start - nd) for chunk in step.prefills],
                         logits_rows=step.logits_rows[nd:] - nd)
        return torch.cat([logits, self._forward_eager(rest, kv)])

    def _forward_eager(self, step: StepInput, kv: KVCache) -> torch.Tensor:
        s, w = self.spec, self.w
        H, Hkv, D = s.num_heads, s.num_kv_heads, s.head_dim
        T = step.input_ids.shape[0]
        x = F.embedding(step.input_ids, w.embed)
        if w.pos_embed is not None:
            x = x + F.embedding(step.positions, w.pos_embed)
        cos = sin = None
        if s.rope:
            cos = w.rope_cos[step.positions].to(self.dtype).unsqueeze(1)   # [T, 1, D]
            sin = w.rope_sin[step.positions].to(self.dtype).unsqueeze(1)
        nd = step.num_decode
        decode_context = _Context.of(kv, step.decode_blocks) if nd else None
        prefill_contexts = [None if c.context_blocks is None else _Context.of(kv, c.context_blocks)
                            for c in step.prefills]
        only_decodes = nd == T
        for i, layer in enumerate(w.layers):
            h = norm(s, x, layer.norm1, layer.norm1_bias)
            qkv = self._linear(h, layer.qkv, layer.qkv_bias)
            if cos is not None:
                # q and k rotate together: one set of elementwise ops instead of two.
                qk = qkv[:, :(H + Hkv) * D].view(T, H + Hkv, D)
                qk = qk * cos + rotate_half(qk) * sin
                q, k = qk[:, :H], qk[:, H:]
            else:
                q = qkv[:, :H * D].view(T, H, D)
                k = qkv[:, H * D:(H + Hkv) * D].view(T, Hkv, D)
            v = qkv[:, (H + Hkv) * D:].view(T, Hkv, D)
            kv.k[i].index_copy_(1, step.slot_mapping, k.transpose(0, 1))
            kv.v[i].index_copy_(1, step.slot_mapping, v.transpose(0, 1))
            if only_decodes:
                attn = self._decode_attention(q, kv, i, step, decode_context)
            else:
                attn = torch.empty(T, H, D, dtype=x.dtype)
                if nd:
                    attn[:nd] = self._decode_attention(q[:nd], kv, i, step, decode_context)
                for chunk, context in zip(step.prefills, prefill_contexts, strict=True):
                    a, b = chunk.start, chunk.start + chunk.length
                    attn[a:b] = self._prefill_attention(q[a:b], k[a:b], v[a:b], kv, i, chunk, context)
            x = x + self._linear(attn.reshape(T, H * D), layer.out, layer.out_bias)
            h = norm(s, x, layer.norm2, layer.norm2_bias)
            if s.gated_mlp:
                gate, up = self._linear(h, layer.up, layer.up_bias).chunk(2, dim=-1)
                h = activation(s, gate) * up
            else:
                h = activation(s, self._linear(h, layer.up, layer.up_bias))
            x = x + self._linear(h, layer.down, layer.down_bias)
        if step.logits_rows is not None:
            x = x[step.logits_rows]
        x = norm(s, x, w.final_norm, w.final_norm_bias)
        return self._linear(x, w.lm_head, w.lm_head_bias).float()
