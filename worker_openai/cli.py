"""Command line of the OpenAI-compatible worker: any server with an OpenAI API becomes a Trellis worker.

    python -m worker_openai --base-url http://vllm:8000/v1 --model Qwen/Qwen2.5-7B-Instruct --upstream-kind vllm \\
        --tokenizer /models/Qwen2.5-7B-Instruct --port 50061

The API key comes from --api-key-file, else the setting upstream.api_key (TRELLIS_WORKER_OPENAI__UPSTREAM__API_KEY,
TRELLIS_UPSTREAM_API_KEY or the config file), else OPENAI_API_KEY; never from the command line, and it is never
logged (a secret setting: masked in --print-config and the settings log line). The worker listens at once,
NOT_SERVING until the upstream answers, and follows the upstream's health from then on (health.py). An upstream
that refuses the key is a configuration error: the worker says so and exits 2, rather than failing every request.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

import httpx
import structlog

from trellis_rpc import tls
from trellis_rpc.errors import StatusError
from trellis_rpc.logs import configure_logging
from trellis_rpc.server import start_server
from trellis_rpc.telemetry import add_metrics_args, shutdown_telemetry
from trellis_rpc.v1 import worker_pb2, worker_pb2_grpc
from trellis_settings import configure
from trellis_settings.parser import log_settings
from worker_openai.engine import OpenAIEngine
from worker_openai.health import REFUSED_KEY, UpstreamHealth
from worker_openai.sampling_fields import KINDS
from worker_openai.scoring import ClassifyScorer, VerifierScorer
from worker_openai.settings import WorkerOpenaiSettings
from worker_openai.upstream import Upstream, UpstreamConfig
from worker_runtime.service import WorkerService
from worker_runtime.telemetry import start_worker_telemetry

log = structlog.get_logger(__name__)

KEY_ENV = ("TRELLIS_UPSTREAM_API_KEY", "OPENAI_API_KEY")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m worker_openai",
                                description="Trellis worker over an OpenAI-compatible server (vLLM, SGLang, "
                                            "llama.cpp, trtllm-serve, transformers serve, hosted endpoints)")
    # Not required=True: it may come from the environment or the config file too (checked below).
    p.add_argument("--base-url", help="the upstream's API root, e.g. http://vllm:8000/v1")
    p.add_argument("--model", help="the upstream's model name (default: the first /models lists)")
    p.add_argument("--served-model-id",
                   help="the model id this worker advertises to routers (default: --model)")
    p.add_argument("--upstream-kind", choices=sorted(KINDS),
                   help="which server it is: decides the vendor extensions sent (top_k, min_p, ...) and what is "
                        "refused with INVALID_ARGUMENT")
    p.add_argument("--api-key-file", help="file holding the upstream's API key "
                                                      f"(else the environment: {' or '.join(KEY_ENV)})")
    p.add_argument("--tokenizer",
                   help="the model's Hugging Face tokenizer (a local directory, or a .gguf file): chats are "
                        "rendered with its template and sent to /completions, so continuations are exact; token ids "
                        "are its ids")
    p.add_argument("--chat-only", action="store_true",
                   help="the upstream has no /completions (e.g. a hosted chat model): text prompts are refused")
    p.add_argument("--max-concurrency", type=int,
                   help="upstream requests in flight (one per sample); beyond, tasks wait (--max-queued) or get "
                        "RESOURCE_EXHAUSTED")
    p.add_argument("--max-queued", type=int,
                   help="tasks that may wait for upstream slots (all n of a task's at once); beyond, "
                        "RESOURCE_EXHAUSTED (0: a task that does not fit is refused at once)")
    p.add_argument("--scheduling", choices=["fcfs", "run_las"],
                   help="the order waiting tasks start in: fcfs (arrival) or run_las (by run: priority, then least "
                        "attained service, with a 10 s anti-starvation bound)")
    p.add_argument("--max-context-tokens", type=int, help="the model's context, advertised (0: unknown)")
    p.add_argument("--max-n", type=int, help="largest n one generate task may ask for")
    p.add_argument("--no-verifier", action="store_true",
                   help="do not offer SCORE_VERIFIER (yes/no from the upstream's top logprobs)")
    p.add_argument("--max-candidates", type=int, help="largest number of candidates per score task")
    p.add_argument("--reward-api", choices=["classify"],
                   help="the upstream serves an outcome reward model instead of generating: 'classify' is vLLM's "
                        "classification API (POST /classify; SGLang's /v1/classify); the worker then offers "
                        "SCORE_OUTCOME only")
    p.add_argument("--reward-url",
                   help="where that API is (default: the server's /classify)")
    p.add_argument("--request-retries", type=int,
                   help="retries of a request that failed to connect or got 502/503/504, before anything streamed")
    p.add_argument("--read-timeout", type=float, help="seconds the upstream may stay silent mid-stream")
    p.add_argument("--health-interval", type=float, help="seconds between probes of the upstream")
    p.add_argument("--health-url",
                   help="what to probe: default the server's /health (vLLM, SGLang, llama.cpp, trtllm-serve and "
                        "transformers serve all have one), or <base-url>/models for --upstream-kind openai")
    p.add_argument("--host")
    p.add_argument("--port", type=int, help="0 picks a free port (printed in the 'serving' log line)")
    p.add_argument("--worker-id", help="defaults to a random id")
    add_metrics_args(p)
    p.add_argument("--drain-seconds", type=float, help="grace period for in-flight work on SIGTERM")
    tls.add_server_args(p)
    configured = configure(p, WorkerOpenaiSettings, "worker_openai", argv)   # defaults: worker_openai/settings.py
    args = configured.args
    args.configured = configured
    if not args.base_url:
        p.error("worker_openai.upstream.base_url (--base-url): required: the upstream's API root, "
                "e.g. http://vllm:8000/v1")
    args.tls = tls.server_tls(args, p)
    if args.max_concurrency < 1:
        p.error("--max-concurrency: must be >= 1")
    if args.max_queued < 0:
        p.error("--max-queued: must be >= 0")
    if args.reward_api and not args.reward_url:
        args.reward_url = str(httpx.URL(args.base_url).join("/classify"))
    if not args.health_url:
        root = httpx.URL(args.base_url)
        args.health_url = (str(root.join("/health")) if args.upstream_kind != "openai"
                           else args.base_url.rstrip("/") + "/models")
    return args


def api_key(args: argparse.Namespace) -> str:
    """--api-key-file, else the setting upstream.api_key (its variables, the older TRELLIS_UPSTREAM_API_KEY, or the
    config file), else OPENAI_API_KEY."""
    if args.api_key_file:
        try:
            return Path(args.api_key_file).read_text().strip()
        except OSError as err:
            raise SystemExit(f"--api-key-file: cannot read {args.api_key_file}: {err.strerror}") from err
    configured = getattr(args, "configured", None)
    if configured is not None and configured.settings.upstream.api_key:
        return configured.settings.upstream.api_key
    return next((os.environ[k] for k in KEY_ENV if os.environ.get(k)), "")


def load_tokenizer(path: str):
    if not path:
        return None
    from transformers import AutoTokenizer

    if path.endswith(".gguf"):   # the tokenizer inside a llama.cpp model file (transformers reads it with gguf)
        file = Path(path)
        return AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
    return AutoTokenizer.from_pretrained(path)


async def serve(args: argparse.Namespace, worker_id: str) -> None:
    upstream = Upstream(UpstreamConfig(base_url=args.base_url, api_key=api_key(args), retries=args.request_retries,
                                       read_timeout_s=args.read_timeout,
                                       max_connections=max(args.max_concurrency, 16)))
    service = WorkerService(worker_id=worker_id, max_n=args.max_n)
    served = await start_server(
        args.host, args.port, lambda server: worker_pb2_grpc.add_WorkerServicer_to_server(service, server),
        (worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name,), tls=args.tls)
    log.info("listening", port=served.port, base_url=args.base_url, state="waiting for the upstream")
    health = UpstreamHealth(upstream, served, args.health_interval, args.health_url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    follower = None
    try:
        tokenizer = await asyncio.to_thread(load_tokenizer, args.tokenizer)
        if not await _finished_first(stop, health.wait_until_up()):
            return
        models = await health.models()
        model = args.model or (models[0] if models else "")
        if not model:
            raise SystemExit("--model: the upstream lists no model; name one")
        if models and model not in models:
            log.warning("the upstream does not list this model", model=model, listed=models[:10])
        kind = KINDS[args.upstream_kind]
        engine = scorer = None
        if args.reward_api:
            scorer = ClassifyScorer(upstream, model, args.reward_url, tokenizer=tokenizer,
                                    engine=f"openai-compatible ({kind.name}, {args.reward_api})",
                                    max_candidates=args.max_candidates, model_id=args.served_model_id)
        else:
            engine = OpenAIEngine(upstream, kind, model, tokenizer=tokenizer, chat_only=args.chat_only,
                                  max_concurrency=args.max_concurrency, max_context_tokens=args.max_context_tokens,
                                  served_model_id=args.served_model_id, scheduling=args.scheduling,
                                  max_queued=args.max_queued)
            if not args.no_verifier and kind.max_logprobs is not None:
                scorer = VerifierScorer(engine, args.max_candidates)
        service.attach(engine, scorer)
        health.up = True
        await served.set_serving(True)
        log.info("serving", port=served.port, model_id=service.model_id, worker_id=worker_id,
                 upstream_kind=kind.name, scores=list(scorer.info.kinds) if scorer else [], pid=os.getpid())
        follower = asyncio.ensure_future(health.follow())
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait({follower, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if follower.done():
            follower.result()   # raises the refused key
        log.info("draining", grace_s=args.drain_seconds)
        health.stopping = True
        await served.set_serving(False)
        await served.server.stop(args.drain_seconds)
    except StatusError as err:
        if err.code not in REFUSED_KEY:
            raise
        log.error("the upstream refused this worker's API key", code=err.code.name, error=err.message,
                  hint="set --api-key-file or " + " / ".join(KEY_ENV))
        raise SystemExit(2) from err
    finally:
        if follower is not None:
            follower.cancel()
        await served.server.stop(0)
        await upstream.close()


async def _finished_first(stop: asyncio.Event, work) -> bool:
    """Run work until it finishes (True; its exception raised) or a signal comes first (False, work cancelled)."""
    job = asyncio.ensure_future(work)
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait({job, stopper}, return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    if not job.done():
        job.cancel()
        return False
    job.result()
    return True


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    configure_logging("worker_openai")
    log_settings(args.configured.loaded, log)
    logging.getLogger("httpx").setLevel(logging.WARNING)   # a line per request otherwise, outside structlog
    worker_id = start_worker_telemetry(args.worker_id, args.metrics_port, args.metrics_host)
    try:
        asyncio.run(serve(args, worker_id))
    except KeyboardInterrupt:
        sys.exit(130)
    finally:
        shutdown_telemetry()
