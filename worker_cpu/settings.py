"""The CPU worker's settings: every flag of `python -m worker_cpu`, in sections, with defaults and bounds in one
place. Nothing reloads: a worker restarts to change them.

The choices of --dtype, --quantize and --compile are written out here rather than imported from torch_engine (whose
modules import torch): the reference generator imports this module, and tests/test_settings_workers.py checks
that they are the engine's."""

from __future__ import annotations

from typing import Literal

from trellis_settings import Section, setting
from trellis_settings.common import ModelLoading, ServerTLS, Telemetry, WorkerServer


class Model(ModelLoading):
    model: str = setting("default", "Hugging Face model directory, a .gguf file, or 'default' (bundled "
                         "SmolLM2-135M-Instruct)", flag="model")
    dtype: Literal["auto", "float32", "bfloat16"] = setting(
        "auto", "auto: float32 activations with quantized weights; otherwise bfloat16 where the CPU runs it natively "
        "(avx512_bf16, amx_bf16), float32 elsewhere", flag="dtype")
    quantize: Literal["auto", "none", "int8", "int4"] = setting(
        "auto", "int8: every linear's weights int8 per output channel (a quarter of float32's bytes per step); int4: "
        "groups of 32 weights (an eighth; the fastest at batch 1, slower than int8 with many sequences); none: the "
        "dtype's; auto: int8 for an already quantized .gguf (the bundled model), none for float checkpoints",
        flag="quantize")
    compile: Literal["auto", "on", "off"] = setting(
        "auto", "the decode step through torch.compile, compiled at start (cached on disk for later starts); auto: "
        "on with quantized weights, where it pays, off otherwise", flag="compile")


class Engine(Section):
    max_batch_size: int = setting(64, "cap on running sequences", flag="max_batch_size", ge=1)
    max_num_tokens: int = setting(512, "token budget per step; longer prompts are prefilled in chunks of at most "
                                  "this many", flag="max_num_tokens", ge=1)
    kv_cache_tokens: int = setting(65536, "KV cache capacity in tokens, preallocated in blocks (SmolLM2-135M fp32: "
                                   "46 KB per token)", flag="kv_cache_tokens", ge=1)
    kv_cache_gib: float = setting(0.0, "KV cache capacity as memory instead (GiB); overrides --kv-cache-tokens "
                                  "when set", flag="kv_cache_gib", ge=0)
    block_size: int = setting(16, "tokens per KV block", flag="block_size", ge=1)
    threads: int = setting(0, "torch threads (0: torch's default)", flag="threads", ge=0)
    max_n: int = setting(64, "largest n one generate task may ask for", flag="max_n", ge=1)
    scheduling: Literal["fcfs", "run_las"] = setting(
        "fcfs", "fcfs: tasks start in arrival order; run_las: each step's rows go by run (priority, then the run "
        "that has attained the least service, with a 10 s anti-starvation bound), and the verifier follows the "
        "same order: short runs finish sooner, long programs later (docs/BENCHMARKS.md)", flag="scheduling")


class Scoring(Section):
    no_verifier: bool = setting(False, "a causal LM worker does not offer SCORE_VERIFIER (yes/no verification on its "
                                "model)", flag="no_verifier")
    max_candidates: int = setting(64, "largest number of candidates one score task may carry", flag="max_candidates",
                                  ge=1)
    score_batch_tokens: int = setting(16384, "padded tokens per scoring forward pass; a score task that needs more "
                                      "runs in several", flag="score_batch_tokens", ge=1)


class WorkerCpuSettings(Section):
    server: WorkerServer = WorkerServer()
    tls: ServerTLS = ServerTLS()
    model: Model = Model()
    engine: Engine = Engine()
    scoring: Scoring = Scoring()
    telemetry: Telemetry = Telemetry()
