"""Command line of the CPU worker: listen at once (NOT_SERVING), load the model, then serve."""

from __future__ import annotations

import argparse
import asyncio
import os

import structlog

from trellis_rpc.logs import configure_logging
from trellis_rpc.server import run_until_signalled, start_server
from trellis_rpc.v1 import worker_pb2, worker_pb2_grpc
from trellis_rpc.worker_service import WorkerService

log = structlog.get_logger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m worker_cpu", description="Trellis CPU worker (PyTorch)")
    p.add_argument("--model", default="default",
                   help="Hugging Face model directory, a .gguf file, or 'default' (bundled SmolLM2-135M-Instruct)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50061, help="0 picks a free port (printed in the 'serving' log line)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--max-batch-size", type=int, default=64, help="cap on running sequences")
    p.add_argument("--kv-cache-tokens", type=int, default=65536,
                   help="KV cache capacity in tokens, preallocated in blocks (SmolLM2-135M fp32: 46 KB per token)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    p.add_argument("--max-num-tokens", type=int, default=512,
                   help="token budget per step; longer prompts are prefilled in chunks of at most this many")
    p.add_argument("--max-n", type=int, default=64, help="largest n one generate task may ask for")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--worker-id", default="", help="defaults to a random id")
    p.add_argument("--drain-seconds", type=float, default=30.0, help="grace period for in-flight work on SIGTERM")
    return p.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    service = WorkerService(worker_id=args.worker_id or None, max_n=args.max_n)
    served = await start_server(
        args.host, args.port, lambda server: worker_pb2_grpc.add_WorkerServicer_to_server(service, server),
        (worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name,))
    log.info("listening", port=served.port, model=args.model, state="loading")

    from worker_cpu.engine import TorchEngine
    from worker_cpu.model_loader import load_model

    loaded = await asyncio.to_thread(load_model, args.model, args.dtype)
    engine = TorchEngine(loaded, max_batch_size=args.max_batch_size, kv_cache_tokens=args.kv_cache_tokens,
                         threads=args.threads or None, max_num_tokens=args.max_num_tokens,
                         block_size=args.block_size)
    service.attach(engine)
    await served.set_serving(True)
    log.info("serving", port=served.port, model_id=loaded.model_id, worker_id=service.worker_id, pid=os.getpid())
    try:
        await run_until_signalled(served, args.drain_seconds)
    finally:
        engine.close()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    configure_logging("worker_cpu")
    asyncio.run(serve(args))
