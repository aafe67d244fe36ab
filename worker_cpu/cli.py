"""Command line of the CPU worker: listen at once (NOT_SERVING), load the model, then serve."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import threading

import structlog

from torch_engine.cpu_dtype import DTYPES, choose_dtype
from torch_engine.model.compiled_decode import COMPILE_MODES
from torch_engine.model.quant import QUANTIZE_CHOICES, choose_quantize
from torch_engine.model_loader import add_model_args, is_quantized_gguf
from torch_engine.scheduler import POLICIES
from trellis_rpc import tls
from trellis_rpc.logs import configure_logging
from trellis_rpc.server import start_server
from trellis_rpc.telemetry import add_metrics_args, shutdown_telemetry
from trellis_rpc.v1 import worker_pb2, worker_pb2_grpc
from trellis_settings import configure
from trellis_settings.parser import log_settings
from worker_cpu.settings import WorkerCpuSettings
from worker_runtime.service import WorkerService
from worker_runtime.telemetry import start_worker_telemetry

log = structlog.get_logger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m worker_cpu", description="Trellis CPU worker (PyTorch)")
    p.add_argument("--model",
                   help="Hugging Face model directory, a .gguf file, or 'default' (bundled SmolLM2-135M-Instruct)")
    p.add_argument("--host")
    p.add_argument("--port", type=int, help="0 picks a free port (printed in the 'serving' log line)")
    p.add_argument("--dtype", choices=DTYPES,
                   help="auto: float32 activations with quantized weights; otherwise bfloat16 where the CPU runs it "
                        "natively (avx512_bf16, amx_bf16), float32 elsewhere")
    p.add_argument("--quantize", choices=QUANTIZE_CHOICES,
                   help="int8: every linear's weights int8 per output channel (a quarter of float32's bytes per "
                        "step); int4: groups of 32 weights (an eighth; the fastest at batch 1, slower than int8 with "
                        "many sequences); none: the dtype's; auto: int8 for an already quantized .gguf (the bundled "
                        "model), none for float checkpoints")
    p.add_argument("--compile", choices=COMPILE_MODES,
                   help="the decode step through torch.compile, compiled at start (cached on disk for later "
                        "starts); auto: on with quantized weights, where it pays, off otherwise")
    p.add_argument("--max-batch-size", type=int, help="cap on running sequences")
    p.add_argument("--kv-cache-tokens", type=int,
                   help="KV cache capacity in tokens, preallocated in blocks (SmolLM2-135M fp32: 46 KB per token)")
    p.add_argument("--kv-cache-gib", type=float,
                   help="KV cache capacity as memory instead (GiB); overrides --kv-cache-tokens when set")
    p.add_argument("--block-size", type=int, help="tokens per KV block")
    p.add_argument("--max-num-tokens", type=int,
                   help="token budget per step; longer prompts are prefilled in chunks of at most this many")
    p.add_argument("--max-n", type=int, help="largest n one generate task may ask for")
    p.add_argument("--scheduling", choices=POLICIES)
    add_model_args(p)
    p.add_argument("--threads", type=int, help="torch threads (0: torch's default)")
    p.add_argument("--worker-id", help="defaults to a random id")
    p.add_argument("--no-verifier", action="store_true",
                   help="a causal LM worker does not offer SCORE_VERIFIER (yes/no verification on its model)")
    p.add_argument("--max-candidates", type=int,
                   help="largest number of candidates one score task may carry")
    p.add_argument("--score-batch-tokens", type=int,
                   help="padded tokens per scoring forward pass; a score task that needs more runs in several")
    add_metrics_args(p)
    p.add_argument("--drain-seconds", type=float, help="grace period for in-flight work on SIGTERM")
    tls.add_server_args(p)
    configured = configure(p, WorkerCpuSettings, "worker_cpu", argv)   # defaults, bounds: worker_cpu/settings.py
    args = configured.args
    args.configured = configured
    args.tls = tls.server_tls(args, p)
    return args


def main(argv: list[str] | None = None) -> None:
    """The gRPC server runs on an asyncio loop in a helper thread; the engine loop gets the main thread
    (torch is ~2x faster there, see torch_engine/engine.py). SIGTERM drains: NOT_SERVING at once,
    in-flight tasks get --drain-seconds, then the engine stops."""
    args = parse_args(argv)
    if configure_logging("worker_cpu") == "json":
        # One JSON object per line: no progress bars (the first .gguf conversion draws one).
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    log_settings(args.configured.loaded, log)
    quantize = choose_quantize(args.quantize, args.quantize == "auto" and is_quantized_gguf(args.model))
    dtype = choose_dtype(args.dtype, quantized_weights=quantize != "none")
    if dtype.warning:
        log.warning("slow dtype for this CPU", dtype=dtype.dtype, warning=dtype.warning)
    else:
        log.info("dtype", dtype=dtype.dtype, requested=args.dtype, reason=dtype.reason)
    worker_id = start_worker_telemetry(args.worker_id, args.metrics_port, args.metrics_host)
    loop = asyncio.new_event_loop()
    rpc = threading.Thread(target=loop.run_forever, name="grpc", daemon=True)
    rpc.start()

    def call(coro):
        return asyncio.run_coroutine_threadsafe(coro, loop).result()

    service = WorkerService(worker_id=worker_id, max_n=args.max_n)
    served = call(start_server(
        args.host, args.port, lambda server: worker_pb2_grpc.add_WorkerServicer_to_server(service, server),
        (worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name,), tls=args.tls))
    log.info("listening", port=served.port, model=args.model, state="loading")

    engine = None
    scorer = None
    stopping = threading.Event()

    async def drain() -> None:
        log.info("draining", grace_s=args.drain_seconds)
        await served.set_serving(False)
        await served.server.stop(args.drain_seconds)
        if engine is not None:
            engine.close()
        if scorer is not None:
            scorer.close()

    def on_signal(signum, frame) -> None:
        if not stopping.is_set():
            stopping.set()
            asyncio.run_coroutine_threadsafe(drain(), loop)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    from torch_engine.engine import TorchEngine
    from torch_engine.model_loader import load_any
    from torch_engine.scoring import scorer_for

    score_options = dict(max_candidates=args.max_candidates, max_batch_tokens=args.score_batch_tokens,
                         threads=args.threads or None, max_context=args.max_context_tokens)
    try:
        try:
            loaded = load_any(args.model, dtype.dtype, args.trust_remote_code)
        except ValueError as err:   # a model this worker will not or cannot load: say why, exit 2
            log.error("cannot load the model", model=args.model, error=str(err))
            raise SystemExit(2) from err
        if not stopping.is_set() and loaded.kind != "causal":
            # A reward model: no generation engine; the scoring loop gets the main thread.
            scorer = scorer_for(loaded, start_thread=False, **score_options)
            service.attach(None, scorer)
            call(served.set_serving(True))
            log.info("serving", port=served.port, model_id=loaded.model_id, worker_id=service.worker_id,
                     pid=os.getpid(), scores=loaded.kind)
            scorer.run()
        elif not stopping.is_set():
            kv_tokens = args.kv_cache_tokens
            if args.kv_cache_gib > 0:
                kv_tokens = int(args.kv_cache_gib * 2**30) // TorchEngine.kv_bytes_per_token(loaded.model)
            engine = TorchEngine(loaded, max_batch_size=args.max_batch_size, kv_cache_tokens=kv_tokens,
                                 threads=args.threads or None, max_num_tokens=args.max_num_tokens,
                                 block_size=args.block_size, start_thread=False,
                                 max_context=args.max_context_tokens, quantize=args.quantize,
                                 compile=args.compile, scheduling=args.scheduling)
            log.info("engine", quantize=engine.quantize, compiled=engine.compiled, dtype=str(engine.dtype))
            if not args.no_verifier:
                try:  # the verifier runs the Hugging Face model on a thread of its own
                    scorer = scorer_for(loaded, **score_options)
                except ValueError as err:
                    log.warning("no verifier", reason=str(err))
            if scorer is not None and args.scheduling == "run_las":
                scorer.gate = engine.scheduler.outranks   # the verifier shares the engine's cores and its run order
            service.attach(engine, scorer)
            call(served.set_serving(True))
            log.info("serving", port=served.port, model_id=loaded.model_id, worker_id=service.worker_id,
                     pid=os.getpid())
            engine.run()
    finally:
        if not stopping.is_set():  # the engine or the loader failed: stop serving before exiting
            call(served.server.stop(0))
        loop.call_soon_threadsafe(loop.stop)
        rpc.join(timeout=5)
        shutdown_telemetry()
