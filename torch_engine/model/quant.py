"""int8 linears: a decode step at small batch is bound by the weight bytes it streams, and int8 streams a quarter
of float32's; an int8 matmul also does several times the work per cycle of a float32 one on x86.

Weights per output channel (w ~= q * scale, q in [-127, 127]); activations per row, quantized as they come in
two int8 passes (the row, then its rounding remainder; see linear), so a row's result depends on that row alone and
a sequence's output does not change with the company it is batched with; torch._int_mm multiplies them in int32
(oneDNN: VNNI where the CPU has it, AVX2 otherwise). Measured on SmolLM2-135M's shapes on a 2-core EPYC: the
lm_head 3.4x float32 F.linear at 1 row and at 32. PyTorch's weight-only kernel (aten._weight_int8pack_mm) was
1.2-26x slower than float32 with float32 activations there, so it is not used. Every linear is quantized, the
lm_head included (for SmolLM2-135M a fifth of the weights); the embedding table stays, since a step reads only its
own rows of it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from torch_engine.model.decoder import DecoderWeights

QUANTIZE_MODES = ("none", "int8")
QUANTIZE_CHOICES = ("auto", *QUANTIZE_MODES)


def choose_quantize(requested: str, quantized_checkpoint: bool) -> str:
    """auto: int8 for a checkpoint that was quantized already (a Q4/Q5/Q8 .gguf such as the bundled model: int8
    is the nearest class the engine runs fast, rather than inflating it to floats), none for float checkpoints,
    whose float32 greedy output the engine reproduces exactly."""
    if requested not in QUANTIZE_CHOICES:
        raise ValueError(f"--quantize: one of {', '.join(QUANTIZE_CHOICES)}, got {requested!r}")
    if requested != "auto":
        return requested
    return "int8" if quantized_checkpoint else "none"


@dataclass
class Int8Weight:
    q: torch.Tensor        # [out, in] int8
    scales: torch.Tensor   # [out] float32

    @property
    def shape(self) -> torch.Size:
        return self.q.shape


def quantize_int8(w: torch.Tensor) -> Int8Weight:
    w32 = w.float()
    scales = (w32.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w32 / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return Int8Weight(q.contiguous(), scales)


def linear(x: torch.Tensor, w: torch.Tensor | Int8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    if not isinstance(w, Int8Weight):
        return F.linear(x, w, bias)
    return int8_linear(x, w.q, w.scales, bias)


def int8_linear(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., in] (any float dtype) times int8 weights q [out, in] with per-channel scales -> [..., out] in x's
    dtype. Tensors only, so torch.compile traces it (compiled_decode.py)."""
    x2 = x.reshape(-1, x.shape[-1]).float()
    rows = x2.shape[0]
    # Two int8 passes per row: the row, then what its int8 rounding left over, each at its own scale. One
    # pass cost 5 points of greedy agreement with float32 on SmolLM2 (outlier channels set the row's scale);
    # with the second, agreement is that of int8 weights alone (96.7% against 97.3%). Both passes go through
    # one GEMM of twice the rows, which at decode costs little more than one: the weights are read once.
    s1 = x2.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.0
    q1 = torch.round(x2 / s1)
    rest = x2 - q1 * s1
    s2 = rest.abs().amax(dim=1, keepdim=True).clamp(min=1e-30) / 127.0
    y = torch._int_mm(torch.cat([q1, torch.round(rest / s2)]).to(torch.int8), q.t())
    y = ((y[:rows] * s1 + y[rows:] * s2) * scales).to(x.dtype).reshape(*x.shape[:-1], q.shape[0])
    return y if bias is None else y + bias


_LAYER_LINEARS = ("qkv", "out", "up", "down")


def quantize_decoder(weights: DecoderWeights, mode: str) -> DecoderWeights:
    """The weights with every linear quantized as `mode` asks (QUANTIZE_MODES)."""
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"--quantize: one of {', '.join(QUANTIZE_MODES)}, got {mode!r}")
    if mode == "none":
        return weights
    layers = [replace(layer, **{name: quantize_int8(getattr(layer, name)) for name in _LAYER_LINEARS})
              for layer in weights.layers]
    return replace(weights, layers=layers, lm_head=quantize_int8(weights.lm_head))
