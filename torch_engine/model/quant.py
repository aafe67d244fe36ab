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

int4 (--quantize int4): weight-only, groups of 32 with a scale and a zero point (Q4_1's grid), through PyTorch's
aten._weight_int4pack_mm_for_cpu with bfloat16 activations: an eighth of float32's bytes, so the batch-1 step is
faster than int8's; at 32 rows and in prefill it is slower than int8 (about fp32's speed), which is why int8 stays
the default. With float32 activations that kernel was 10-30x slower, so activations go in as bfloat16.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from torch_engine.model.decoder import DecoderWeights

QUANTIZE_MODES = ("none", "int8", "int4")
QUANTIZE_CHOICES = ("auto", *QUANTIZE_MODES)
INT4_GROUP = 32  # a scale and a zero point per 32 weights of a row, the grid of GGUF's Q4_1


def choose_quantize(requested: str, quantized_checkpoint: bool) -> str:
    """auto: int8 for a checkpoint that was quantized already (a Q4/Q5/Q8 .gguf such as the bundled model), rather
    than inflating it to floats; none for float checkpoints, whose float32 greedy output the engine reproduces
    exactly. Not int4, though it keeps a Q4 file's own grid: its kernel is the faster one at batch 1 only, and
    inference-time compute runs many samples at once (docs/BENCHMARKS.md)."""
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


@dataclass
class Int4Weight:
    """Weights in groups of INT4_GROUP along a row: w ~= (q - 8) * scale + zero, q in [0, 15], packed for
    aten._weight_int4pack_mm_for_cpu (which takes bfloat16 activations)."""
    packed: torch.Tensor        # uint8, the kernel's layout
    scales_zeros: torch.Tensor  # [in / group, out, 2] bfloat16
    out_features: int
    in_features: int

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.out_features, self.in_features))


def quantize_int4(w: torch.Tensor) -> Int4Weight | Int8Weight:
    """Asymmetric 4-bit groups (min and max of each group of 32 on a 16-step grid): applied to weights that were
    a Q4_1 .gguf, it finds that file's own grid again. A row length that is not a multiple of the group falls
    back to int8."""
    out_features, in_features = w.shape
    if in_features % INT4_GROUP:
        return quantize_int8(w)
    groups = w.float().view(out_features, in_features // INT4_GROUP, INT4_GROUP)
    low, high = groups.amin(-1), groups.amax(-1)
    scale = ((high - low) / 15).clamp(min=1e-12)
    q = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.view(out_features, in_features), 1)
    scales_zeros = torch.stack([scale, low + 8 * scale], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return Int4Weight(packed, scales_zeros, out_features, in_features)


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, bias: torch.Tensor | None
                ) -> torch.Tensor:
    """x [..., in] times int4 weights -> [..., out] in x's dtype; each row's result depends on that row alone
    (checked in tests)."""
    x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, INT4_GROUP, scales_zeros)
    y = y.to(x.dtype).reshape(*x.shape[:-1], scales_zeros.shape[1])
    return y if bias is None else y + bias


def quantize_int8(w: torch.Tensor) -> Int8Weight:
    w32 = w.float()
    scales = (w32.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w32 / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return Int8Weight(q.contiguous(), scales)


QuantWeight = Int8Weight | Int4Weight


def linear(x: torch.Tensor, w: torch.Tensor | QuantWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    if isinstance(w, Int8Weight):
        return int8_linear(x, w.q, w.scales, bias)
    if isinstance(w, Int4Weight):
        return int4_linear(x, w.packed, w.scales_zeros, bias)
    return F.linear(x, w, bias)


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
    quantize = quantize_int8 if mode == "int8" else quantize_int4
    layers = [replace(layer, **{name: quantize(getattr(layer, name)) for name in _LAYER_LINEARS})
              for layer in weights.layers]
    # The lm_head stays int8 under int4, as 4-bit GGUF files keep theirs at 6 or 8 bits (the bundled one: Q8_0).
    return replace(weights, layers=layers, lm_head=quantize_int8(weights.lm_head))
