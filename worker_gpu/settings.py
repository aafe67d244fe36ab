"""The GPU worker's settings: every flag of `python -m worker_gpu`, in sections, with defaults and bounds in one
place. Nothing reloads: a worker restarts to change them.

Nothing here imports torch_engine or TensorRT-LLM (the worker imports them lazily, and the reference generator
imports this module); tests/test_settings_workers.py checks that the engine choices are worker_gpu.cli.ENGINES."""

from __future__ import annotations

from typing import Literal

from pydantic import field_validator

from trellis_settings import Section, setting
from trellis_settings.common import ModelLoading, ServerTLS, Telemetry, WorkerServer


class Model(ModelLoading):
    model: str = setting("default", "Hugging Face model directory (or 'default': the bundled SmolLM2-135M-Instruct)",
                         flag="model")
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = setting(
        "auto", "auto: the model's own dtype on TensorRT-LLM, bfloat16 on the torch engine", flag="dtype")


class Engine(Section):
    engine: Literal["tensorrt-llm", "torch"] = setting(
        "tensorrt-llm", "tensorrt-llm: TensorRT-LLM's LLM API (PyTorch backend); torch: Trellis' own PyTorch engine",
        flag="engine")
    device: str = setting("cuda", "torch engine: the torch device (cuda, cuda:1, or cpu)", flag="device")
    max_batch_size: int = setting(256, "cap on sequences in flight", flag="max_batch_size", ge=1)
    max_num_tokens: int = setting(8192, "token budget per engine step", flag="max_num_tokens", ge=1)
    kv_cache_free_gpu_memory_fraction: float = setting(
        0.9, "share of the GPU memory left after loading the weights that the KV cache may take",
        flag="kv_cache_free_gpu_memory_fraction", gt=0, le=1)
    kv_cache_tokens: int = setting(262144, "torch engine: KV cache capacity in tokens", flag="kv_cache_tokens", ge=1)
    max_n: int = setting(64, "largest n one generate task may ask for", flag="max_n", ge=1)


class Scoring(Section):
    no_verifier: bool = setting(False, "do not offer SCORE_VERIFIER on the worker's model", flag="no_verifier")
    prm_tokens: str = setting("", "serve process rewards from a causal-LM PRM: 'GOOD,BAD' (e.g. '+,-' for "
                              "Math-Shepherd); a step's score is P(GOOD) / (P(GOOD) + P(BAD)) at its separator",
                              flag="prm_tokens")

    @field_validator("prm_tokens")
    @classmethod
    def _two_tokens(cls, value: str) -> str:
        if value and len(value.split(",")) != 2:
            raise ValueError("give two tokens, GOOD,BAD")
        return value


class WorkerGpuSettings(Section):
    server: WorkerServer = WorkerServer()
    tls: ServerTLS = ServerTLS()
    model: Model = Model()
    engine: Engine = Engine()
    scoring: Scoring = Scoring()
    telemetry: Telemetry = Telemetry()
