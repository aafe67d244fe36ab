"""The decode step compiled with torch.compile (inductor's C++ CPU backend).

A decode step of a small model at small batch is mostly the overhead between kernels: each layer's
dozen elementwise ops (norms, rotary, activation quantization, residuals) are separate passes over
memory with a Python dispatch each. Compiled, they fuse into a few C++ loops around the matmuls.
Measured on SmolLM2-135M (2-core EPYC, int8 weights, through the engine): batch-1 step 26.3 -> 23.3 ms,
batch 32 143 -> 94 ms (docs/BENCHMARKS.md); with float32 weights the step is bound by the weight GEMVs and
compiling does not pay (54 -> 57 ms at batch 1), so the engine compiles only quantized decoders by default
(`compile="auto"`).

What is compiled is one layer, called once per layer with that layer's weights as arguments, so there
is one graph for all layers (compiling the whole 30-layer forward took minutes), and the final norm
with the lm_head. The shapes that vary, batch rows and context length, are dynamic (marked, the rest
static), so steps never recompile; batch 1 is padded to 2 rows (the padding row writes its K/V into a
scratch slot) so that every step runs the same kernels and a sequence's logits do not depend on how
many others share its step. Decode rows of a step that also prefills go through the same compiled graph, the prefill
chunks through the eager decoder, for the same reason. Inductor caches what it compiled on disk
(TORCHINDUCTOR_CACHE_DIR, under the Trellis cache), so later worker starts skip most of the work.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog
import torch
import torch.nn.functional as F

from torch_engine.model.decoder import DecoderSpec, DecoderWeights, LayerWeights, activation, norm, rotate_half
from torch_engine.model.kv_cache import KVCache
from torch_engine.model.quant import Int4Weight, Int8Weight, QuantWeight, int4_linear, int8_linear

log = structlog.get_logger(__name__)

COMPILE_MODES = ("auto", "on", "off")


def cxx_compiler() -> str | None:
    """The C++ compiler inductor's CPU backend would run (its CXX setting, else g++ or clang++ on PATH)."""
    from torch._inductor import config

    for name in (config.cpp.cxx[1] if isinstance(config.cpp.cxx, tuple) else None, "g++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def should_compile(mode: str, quantize: str) -> bool:
    """auto: for quantized weights where a C++ compiler is there to build the kernels (the engine also falls back
    to eager if compiling fails); on: always, and a failure is an error."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"--compile: one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    if mode == "auto" and quantize != "none" and cxx_compiler() is None:
        log.warning("no C++ compiler (g++ or clang++): the decode step runs eagerly; install one to compile it")
        return False
    return mode == "on" or (mode == "auto" and quantize != "none")


def _mm(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """quant.linear over flat tensors: float weights (no scales), int8 weights with their per-channel scales, or
    packed int4 weights (uint8) with their group scales and zeros. The dtypes are static to the trace."""
    if scales is None:
        return F.linear(x, w, bias)
    if w.dtype == torch.int8:
        return int8_linear(x, w, scales, bias)
    return int4_linear(x, w, scales, bias)


def _weight_args(w: torch.Tensor | QuantWeight) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(w, Int8Weight):
        return w.q, w.scales
    if isinstance(w, Int4Weight):
        return w.packed, w.scales_zeros
    return w, None


@dataclass
class _LayerArgs:
    """A layer's tensors in the flat form the compiled function takes."""
    tensors: tuple[torch.Tensor | None, ...]

    @classmethod
    def of(cls, layer: LayerWeights) -> _LayerArgs:
        return cls((layer.norm1, layer.norm1_bias, *_weight_args(layer.qkv), layer.qkv_bias,
                    *_weight_args(layer.out), layer.out_bias, layer.norm2, layer.norm2_bias,
                    *_weight_args(layer.up), layer.up_bias, *_weight_args(layer.down), layer.down_bias))


def _decode_layer_fn(spec: DecoderSpec, dtype: torch.dtype) -> Callable:
    H, Hkv, D = spec.num_heads, spec.num_kv_heads, spec.head_dim
    group, scale = H // Hkv, D ** -0.5

    def layer(x, cos, sin, k_cache, v_cache, slots, context_slots, lengths,
              norm1, norm1_b, qkv, qkv_s, qkv_b, out, out_s, out_b, norm2, norm2_b, up, up_s, up_b,
              down, down_s, down_b):
        """x [B, hidden]; k_cache, v_cache [Hkv, slots, D]; slots [B] where this token's K/V go;
        context_slots [B, L] the slots each row attends to, valid below lengths [B]."""
        B = x.shape[0]
        h = norm(spec, x, norm1, norm1_b)
        qkv_out = _mm(h, qkv, qkv_s, qkv_b)
        if spec.rope:
            qk = qkv_out[:, :(H + Hkv) * D].view(B, H + Hkv, D)
            qk = qk * cos + rotate_half(qk) * sin
            q, k = qk[:, :H], qk[:, H:]
        else:
            q = qkv_out[:, :H * D].view(B, H, D)
            k = qkv_out[:, H * D:(H + Hkv) * D].view(B, Hkv, D)
        v = qkv_out[:, (H + Hkv) * D:].view(B, Hkv, D)
        k_cache.index_copy_(1, slots, k.transpose(0, 1))
        v_cache.index_copy_(1, slots, v.transpose(0, 1))
        keys, values = k_cache[:, context_slots], v_cache[:, context_slots]             # [Hkv, B, L, D]
        qg = q.reshape(B, Hkv, group, D).transpose(0, 1)                                # [Hkv, B, G, D]
        scores = torch.matmul(qg, keys.transpose(-1, -2))                               # [Hkv, B, G, L]
        valid = torch.arange(context_slots.shape[1]).view(1, 1, 1, -1) < lengths.view(1, B, 1, 1)
        probs = torch.softmax((scores * scale).masked_fill(~valid, float("-inf")), dim=-1, dtype=torch.float32)
        attn = torch.matmul(probs.to(dtype), values).transpose(0, 1).reshape(B, H * D)
        x = x + _mm(attn, out, out_s, out_b)
        h = norm(spec, x, norm2, norm2_b)
        if spec.gated_mlp:
            gate, up_out = _mm(h, up, up_s, up_b).chunk(2, dim=-1)
            h = activation(spec, gate) * up_out
        else:
            h = activation(spec, _mm(h, up, up_s, up_b))
        return x + _mm(h, down, down_s, down_b)

    return layer


def _head_fn(spec: DecoderSpec) -> Callable:
    def head(x, final_norm, final_norm_b, lm, lm_s, lm_b):
        return _mm(norm(spec, x, final_norm, final_norm_b), lm, lm_s, lm_b).float()

    return head


def _use_trellis_inductor_cache() -> None:
    """Inductor's on-disk cache under the Trellis cache (it persists where /tmp does not), unless the user chose
    a directory: torch sets the variable to its /tmp default the first time it looks, so that value is ours to
    replace."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from torch_engine.model_loader import cache_root

    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_root() / "inductor")


class CompiledDecode:
    """Decode-only forward passes (one new token per row) through the compiled layer and head."""

    def __init__(self, weights: DecoderWeights, dtype: torch.dtype, scratch_slot: int) -> None:
        _use_trellis_inductor_cache()
        # Duck sizing assumes dimensions equal at trace time stay equal (batch rows 2 and the cache's K/V axis
        # of 2, or 3 rows and 3 KV heads), which recompiled the graph for the next batch size; off, one graph
        # serves every size. (A compile-time setting; nothing else in the worker compiles.)
        torch.fx.experimental._config.use_duck_shape = False
        # Every engine in a process compiles the same functions (the layer's code is shared by all of them), each
        # with its own model's shapes: past dynamo's default of 8 graphs per function, a third engine's compile
        # failed (tests and benchmarks build several; a worker builds one).
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 1024)
        self.w = weights
        self.spec = weights.spec
        self.dtype = dtype
        self.scratch_slot = scratch_slot
        self.layer_args = [_LayerArgs.of(layer).tensors for layer in weights.layers]
        self.head_args = (weights.final_norm, weights.final_norm_bias, *_weight_args(weights.lm_head),
                          weights.lm_head_bias)
        self.layer = torch.compile(_decode_layer_fn(self.spec, dtype), fullgraph=True)
        self.head = torch.compile(_head_fn(self.spec), fullgraph=True)
        self.int8_linear = torch.compile(int8_linear, dynamic=True, fullgraph=True)  # for the eager prefill

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                blocks: torch.Tensor, lengths: torch.Tensor, kv: KVCache) -> torch.Tensor:
        """One token per row: input_ids, positions, slots, lengths [B]; blocks [B, nb] block tables (padded).
        Returns float32 logits [B, vocab]."""
        rows = input_ids.shape[0]
        # A size of 1 would get a graph of its own (torch.compile specializes 0 and 1): pad one row (see the module
        # docstring) and one block column (masked) so every step runs the same kernels and nothing compiles
        # while serving.
        if rows == 1:
            input_ids = torch.cat([input_ids, input_ids.new_zeros(1)])
            positions = torch.cat([positions, positions.new_zeros(1)])
            slots = torch.cat([slots, slots.new_full((1,), self.scratch_slot)])
            blocks = torch.cat([blocks, blocks.new_zeros(1, blocks.shape[1])])
            lengths = torch.cat([lengths, lengths.new_ones(1)])
        if blocks.shape[1] == 1:
            blocks = torch.cat([blocks, blocks.new_zeros(blocks.shape[0], 1)], dim=1)
        w, s = self.w, self.spec
        x = F.embedding(input_ids, w.embed)
        if w.pos_embed is not None:
            x = x + F.embedding(positions, w.pos_embed)
        cos = sin = None
        if s.rope:
            cos = w.rope_cos[positions].to(self.dtype).unsqueeze(1)
            sin = w.rope_sin[positions].to(self.dtype).unsqueeze(1)
        bs = kv.block_size
        context_slots = (blocks.unsqueeze(-1) * bs + torch.arange(bs)).view(blocks.shape[0], -1)
        # Only the batch rows and the context are dynamic: with every dimension symbolic (dynamic=True) tracing
        # took 15 s even from inductor's cache, against 3 s with the weights' shapes static.
        for t in (x, cos, sin, slots, context_slots, lengths):
            if t is not None:
                torch._dynamo.mark_dynamic(t, 0)
        torch._dynamo.mark_dynamic(context_slots, 1)
        for i, args in enumerate(self.layer_args):
            x = self.layer(x, cos, sin, kv.k[i], kv.v[i], slots, context_slots, lengths, *args)
        torch._dynamo.mark_dynamic(x, 0)
        return self.head(x, *self.head_args)[:rows]

    def warm_up(self, kv: KVCache, max_rows: int) -> float:
        """Compile now (at worker start) rather than on the first request; returns the seconds it took."""
        t0 = time.perf_counter()
        log.info("compiling the decode step", note="first start takes a while; later starts reuse inductor's cache")
        with torch.inference_mode():
            for rows, nblocks in ((1, 1), (min(max_rows, 3), 3)):
                ids = torch.zeros(rows, dtype=torch.long)
                self.forward(ids, ids.clone(), torch.full((rows,), self.scratch_slot), torch.zeros(rows, nblocks,
                             dtype=torch.long), torch.ones(rows, dtype=torch.long), kv)
                layer = self.w.layers[0]
                for w, bias in ((layer.qkv, layer.qkv_bias), (layer.down, layer.down_bias)):
                    if isinstance(w, Int8Weight):  # the prefill's linears, one token and several
                        self.int8_linear(torch.zeros(rows, w.shape[1], dtype=self.dtype), w.q, w.scales, bias)
        seconds = time.perf_counter() - t0
        log.info("decode step compiled", seconds=round(seconds, 1))
        return seconds
