"""The dtype the CPU runs: bfloat16 only where it executes bf16 natively, float32 elsewhere.

bfloat16 halves the weight bytes a decode step streams, which pays on CPUs with bf16 instructions (AVX512-BF16,
AMX): measured about 2x float32 on an AVX-512 EPYC with avx512_bf16 (docs/BENCHMARKS.md). Without them torch
emulates bf16 matmuls through float32 conversions: on a 2-core AVX2 EPYC a bf16 matmul ran ~10x slower than
float32 and the engine 0.4x its float32 speed. So `auto` asks the CPU, and an explicit bfloat16 on a CPU without
bf16 instructions starts with a warning saying so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
DTYPES = ("auto", "float32", "bfloat16")


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo); empty where they cannot be read."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


@dataclass(frozen=True)
class DtypeChoice:
    dtype: str          # "float32" | "bfloat16"
    reason: str
    warning: str = ""   # set when the choice will be slow on this CPU


def choose_dtype(requested: str, flags: set[str] | None = None, quantized_weights: bool = False) -> DtypeChoice:
    """requested: one of DTYPES. flags: the CPU's (read from /proc/cpuinfo when None). quantized_weights: the
    linears will run on int8 or int4 weights (--quantize), so the dtype is only the activations'."""
    if requested not in DTYPES:
        raise ValueError(f"--dtype: one of {', '.join(DTYPES)}, got {requested!r}")
    flags = cpu_flags() if flags is None else flags
    native = sorted(f for f in NATIVE_BF16_FLAGS if f in flags)
    if requested == "auto" and quantized_weights:
        # Measured with int8 weights on an avx512_bf16 EPYC: bf16 activations made the batch-1 step slower
        # (25.9 against 20.7 ms) and batch 32 only a little faster; int8's quality was measured in float32.
        return DtypeChoice("float32", "quantized weights: the matmuls run on int8 / int4 weights, activations in "
                                      "float32")
    if requested == "auto":
        if native:
            return DtypeChoice("bfloat16", f"the CPU runs bf16 natively ({', '.join(native)})")
        return DtypeChoice("float32", "the CPU has no bf16 instructions (no avx512_bf16 or amx_bf16): float32 "
                                      "is the fast dtype here")
    if requested == "bfloat16" and not native:
        return DtypeChoice("bfloat16", "asked for", warning=(
            "this CPU has no bf16 instructions (no avx512_bf16 or amx_bf16): torch emulates bf16 matmuls, "
            "several times slower than float32 (~10x per matmul, 0.4x the engine's float32 speed on a 2-core AVX2 "
            "EPYC); leave --dtype at auto"))
    return DtypeChoice(requested, "asked for")
