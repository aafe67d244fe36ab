"""Weight-only int8 linears: a decode step at small batch is bound by the weight bytes it streams, and int8
streams a quarter of float32's (half of bfloat16's).

Per output channel: w ~= q * scale, q in [-127, 127]; activations stay in the engine's dtype, and the matmul is
PyTorch's own weight-only kernel (aten._weight_int8pack_mm, AVX2 and AVX-512 on the CPU), so it runs on CPUs
without AVX-512 too. Every linear is quantized, the lm_head included (for SmolLM2-135M it is a fifth of the
weights); the embedding table stays, since a step reads only its own rows of it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from torch_engine.model.decoder import DecoderWeights

QUANTIZE_MODES = ("none", "int8")


@dataclass
class Int8Weight:
    q: torch.Tensor        # [out, in] int8
    scales: torch.Tensor   # [out], the activations' dtype

    @property
    def shape(self) -> torch.Size:
        return self.q.shape


def quantize_int8(w: torch.Tensor) -> Int8Weight:
    w32 = w.float()
    scales = (w32.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w32 / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return Int8Weight(q.contiguous(), scales.to(w.dtype))


def linear(x: torch.Tensor, w: torch.Tensor | Int8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    if isinstance(w, Int8Weight):
        y = torch.ops.aten._weight_int8pack_mm(x.contiguous(), w.q, w.scales)
        return y if bias is None else y + bias
    return F.linear(x, w, bias)


_LAYER_LINEARS = ("qkv", "out", "up", "down")


def quantize_decoder(weights: DecoderWeights, mode: str) -> DecoderWeights:
    """The weights with every linear quantized as `mode` asks (QUANTIZE_MODES); the float weights they replace
    are dropped, so memory goes down with the bytes each step reads."""
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"--quantize: one of {', '.join(QUANTIZE_MODES)}, got {mode!r}")
    if mode == "none":
        return weights
    layers = [replace(layer, **{name: quantize_int8(getattr(layer, name)) for name in _LAYER_LINEARS})
              for layer in weights.layers]
    return replace(weights, layers=layers, lm_head=quantize_int8(weights.lm_head))
