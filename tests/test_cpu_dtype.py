"""--dtype auto: bfloat16 only on CPUs that run it natively, on faked CPU flags (no timing)."""

from __future__ import annotations

import pytest

from torch_engine.cpu_dtype import choose_dtype, cpu_flags

AVX2_EPYC = "processor\t: 0\nflags\t\t: fpu sse sse2 avx avx2 fma\n"
BF16_EPYC = "processor\t: 0\nflags\t\t: fpu avx avx2 avx512f avx512bw avx512_bf16 fma\n"
SAPPHIRE_RAPIDS = "flags\t\t: avx2 avx512f amx_tile amx_bf16 amx_int8\n"


def test_cpu_flags_are_read_from_cpuinfo():
    assert {"avx2", "fma"} <= cpu_flags(AVX2_EPYC) and "avx512_bf16" not in cpu_flags(AVX2_EPYC)
    assert cpu_flags("no flags line here") == set()


@pytest.mark.parametrize("cpuinfo, expected", [(AVX2_EPYC, "float32"), (BF16_EPYC, "bfloat16"),
                                               (SAPPHIRE_RAPIDS, "bfloat16")])
def test_auto_picks_bfloat16_only_where_the_cpu_runs_it(cpuinfo, expected):
    choice = choose_dtype("auto", cpu_flags(cpuinfo))
    assert choice.dtype == expected and not choice.warning
    assert ("natively" in choice.reason) == (expected == "bfloat16")


def test_an_explicit_bfloat16_without_bf16_instructions_warns_how_slow_it_is():
    choice = choose_dtype("bfloat16", cpu_flags(AVX2_EPYC))
    assert choice.dtype == "bfloat16" and "no bf16 instructions" in choice.warning and "slower" in choice.warning
    assert not choose_dtype("bfloat16", cpu_flags(BF16_EPYC)).warning
    assert choose_dtype("float32", cpu_flags(BF16_EPYC)).dtype == "float32"


def test_an_unknown_dtype_is_refused():
    with pytest.raises(ValueError, match="--dtype"):
        choose_dtype("float8", set())
