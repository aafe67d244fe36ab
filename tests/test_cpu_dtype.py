"""The engine's automatic choices: --dtype auto (bfloat16 only on CPUs that run it natively, on faked CPU flags),
--quantize auto (int8 for an already quantized .gguf), --compile auto (for quantized decoders). No timing."""

from __future__ import annotations

import pytest

from torch_engine.cpu_dtype import choose_dtype, cpu_flags
from torch_engine.model.compiled_decode import should_compile
from torch_engine.model.quant import choose_quantize
from torch_engine.model_loader import bundled_gguf, gguf_weight_type, is_quantized_gguf

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


def test_with_int8_weights_auto_keeps_float32_activations_even_with_bf16():
    for cpuinfo in (AVX2_EPYC, BF16_EPYC, SAPPHIRE_RAPIDS):
        assert choose_dtype("auto", cpu_flags(cpuinfo), quantized_weights=True).dtype == "float32"
    assert choose_dtype("bfloat16", cpu_flags(BF16_EPYC), quantized_weights=True).dtype == "bfloat16"


def test_quantize_auto_keeps_a_quantized_gguf_quantized_and_float_checkpoints_exact():
    assert choose_quantize("auto", quantized_checkpoint=True) == "int8"
    assert choose_quantize("auto", quantized_checkpoint=False) == "none"
    assert choose_quantize("none", quantized_checkpoint=True) == "none"
    with pytest.raises(ValueError, match="--quantize"):
        choose_quantize("int3", quantized_checkpoint=False)


def test_the_bundled_model_is_a_quantized_gguf_and_a_directory_is_not(tiny_model):
    assert gguf_weight_type(bundled_gguf()) == "Q4_1"
    assert is_quantized_gguf("default")
    assert not is_quantized_gguf(str(tiny_model)) and not is_quantized_gguf("/no/such/model")


def test_compile_auto_compiles_quantized_decoders_only():
    assert should_compile("auto", "int8") and not should_compile("auto", "none")
    assert should_compile("on", "none") and not should_compile("off", "int8")
    with pytest.raises(ValueError, match="--compile"):
        should_compile("maybe", "none")
