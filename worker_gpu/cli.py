"""Command line of the GPU worker: listen at once (NOT_SERVING), load the model, then serve.

    python -m worker_gpu --model /models/Qwen2.5-7B-Instruct                 # TensorRT-LLM (PyTorch backend)
    python -m worker_gpu --engine torch --model default --device cuda        # Trellis' own PyTorch engine

Both serve the worker contract of worker_runtime.service, exactly as worker_cpu does.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

import structlog

from trellis_rpc import tls
from trellis_rpc.logs import configure_logging
from trellis_rpc.server import run_until_signalled, start_server
from trellis_rpc.telemetry import add_metrics_args, shutdown_telemetry
from trellis_rpc.v1 import worker_pb2, worker_pb2_grpc
from trellis_settings import configure
from trellis_settings.parser import log_settings
from worker_gpu.settings import WorkerGpuSettings
from worker_runtime.service import WorkerService
from worker_runtime.telemetry import start_worker_telemetry

log = structlog.get_logger(__name__)

ENGINES = ("tensorrt-llm", "torch")
TRTLLM_IMAGE = "nvcr.io/nvidia/tensorrt-llm/release"
MISSING_TRTLLM = (
    "worker_gpu --engine tensorrt-llm needs TensorRT-LLM, which is not installed in this environment "
    "(PyPI only holds a placeholder). Run the worker in NVIDIA's TensorRT-LLM image ({image}:<tag>; "
    "deploy/docker/worker-gpu.Dockerfile builds on it), or install the wheel from NVIDIA's index "
    "(pip install tensorrt_llm --extra-index-url https://pypi.nvidia.com) on a CUDA machine; "
    "or run Trellis' own PyTorch engine instead: --engine torch.")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from torch_engine.model_loader import add_model_args  # torch_engine is imported lazily (ARCHITECTURE.md)

    p = argparse.ArgumentParser(prog="python -m worker_gpu", description="Trellis GPU worker (TensorRT-LLM or torch)")
    p.add_argument("--engine", choices=ENGINES)
    p.add_argument("--model",
                   help="Hugging Face model directory (or 'default': the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--host")
    p.add_argument("--port", type=int, help="0 picks a free port (printed in the 'serving' log line)")
    p.add_argument("--dtype", choices=["auto", "float16", "bfloat16", "float32"],
                   help="auto: the model's own dtype on TensorRT-LLM, bfloat16 on the torch engine")
    p.add_argument("--max-batch-size", type=int, help="cap on sequences in flight")
    p.add_argument("--max-num-tokens", type=int, help="token budget per engine step")
    p.add_argument("--kv-cache-free-gpu-memory-fraction", type=float,
                   help="share of the GPU memory left after loading the weights that the KV cache may take")
    p.add_argument("--kv-cache-tokens", type=int, help="torch engine: KV cache capacity in tokens")
    p.add_argument("--device", help="torch engine: the torch device (cuda, cuda:1, or cpu)")
    p.add_argument("--max-n", type=int, help="largest n one generate task may ask for")
    add_model_args(p)
    p.add_argument("--no-verifier", action="store_true", help="do not offer SCORE_VERIFIER on the worker's model")
    p.add_argument("--prm-tokens",
                   help="serve process rewards from a causal-LM PRM: 'GOOD,BAD' (e.g. '+,-' for Math-Shepherd); "
                        "a step's score is P(GOOD) / (P(GOOD) + P(BAD)) at its separator")
    p.add_argument("--worker-id", help="defaults to a random id")
    add_metrics_args(p)
    p.add_argument("--drain-seconds", type=float, help="grace period for in-flight work on SIGTERM")
    tls.add_server_args(p)
    configured = configure(p, WorkerGpuSettings, "worker_gpu", argv)   # defaults, bounds: worker_gpu/settings.py
    args = configured.args
    args.configured = configured
    args.tls = tls.server_tls(args, p)
    if not 0.0 < args.kv_cache_free_gpu_memory_fraction <= 1.0:
        p.error("--kv-cache-free-gpu-memory-fraction: must be in (0, 1]")
    if args.prm_tokens and len(args.prm_tokens.split(",")) != 2:
        p.error("--prm-tokens: give two tokens, GOOD,BAD")
    return args


def trtllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorrt_llm") is not None


def build(args: argparse.Namespace):
    """(engine, scorer) for the chosen engine; runs on a helper thread (loading takes a while)."""
    if args.engine == "tensorrt-llm":
        from worker_gpu.trtllm_engine import build_trtllm

        return build_trtllm(args)
    from worker_gpu.torch_backend import build_torch

    return build_torch(args)


async def serve(args: argparse.Namespace, worker_id: str) -> None:
    service = WorkerService(worker_id=worker_id, max_n=args.max_n)
    served = await start_server(
        args.host, args.port, lambda server: worker_pb2_grpc.add_WorkerServicer_to_server(service, server),
        (worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name,), tls=args.tls)
    log.info("listening", port=served.port, model=args.model, engine=args.engine, state="loading")
    loading = asyncio.ensure_future(asyncio.to_thread(build, args))
    engine = scorer = None
    try:
        try:
            engine, scorer = await loading
        except ValueError as err:   # a model this worker will not or cannot load: say why, exit 2
            log.error("cannot load the model", model=args.model, error=str(err))
            raise SystemExit(2) from err
        service.attach(engine, scorer)
        await served.set_serving(True)
        log.info("serving", port=served.port, model_id=service.model_id, worker_id=worker_id, engine=args.engine,
                 pid=os.getpid())
        await run_until_signalled(served, args.drain_seconds)
    finally:
        await served.server.stop(0)
        for part in (engine, scorer):
            if part is not None:
                part.close()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    configure_logging("worker_gpu")
    log_settings(args.configured.loaded, log)
    if args.engine == "tensorrt-llm" and not trtllm_available():
        print(MISSING_TRTLLM.format(image=TRTLLM_IMAGE), file=sys.stderr)
        raise SystemExit(2)
    worker_id = start_worker_telemetry(args.worker_id, args.metrics_port, args.metrics_host)
    try:
        asyncio.run(serve(args, worker_id))
    finally:
        shutdown_telemetry()
