"""Command line of the router."""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path

import structlog

from router.admission import Admission
from router.auth import Authenticator
from router.discovery import Discovery
from router.limits import Limits
from router.pool import WorkerPool
from router.routing import POLICIES, RoutingPolicy
from router.service import RouterService
from router.settings import RouterSettings
from trellis_rpc import tls
from trellis_rpc.logs import configure_logging
from trellis_rpc.server import run_until_signalled, start_server
from trellis_rpc.telemetry import add_metrics_args, configure_metrics, configure_tracing, shutdown_telemetry
from trellis_rpc.undecodable import RefuseUndecodable
from trellis_rpc.v1 import router_pb2, router_pb2_grpc
from trellis_settings import SettingsError, configure
from trellis_settings.layers import Loaded
from trellis_settings.parser import log_settings
from trellis_settings.reload import Reloader

log = structlog.get_logger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m router", description="Trellis router")
    # Defaults, bounds and help live in router/settings.py (configure() shows them in --help)
    p.add_argument("--workers")
    p.add_argument("--discovery-interval", type=float)
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--max-n", type=int)
    p.add_argument("--worker-wait-seconds", type=float)
    add_metrics_args(p)
    p.add_argument("--drain-seconds", type=float)
    p.add_argument("--max-running-runs", type=int)
    p.add_argument("--max-queued-runs", type=int)
    p.add_argument("--max-runs-per-client", type=int)
    p.add_argument("--max-migrations", type=int)
    p.add_argument("--routing", choices=POLICIES)
    p.add_argument("--overlap-weight", type=float)
    p.add_argument("--reallocate", choices=("off", "certaindex"))
    p.add_argument("--certainty", type=float)
    p.add_argument("--auth-file", type=Path)
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--max-prompt-chars", type=int)
    p.add_argument("--max-run-seconds", type=float)
    p.add_argument("--max-tasks-per-run", type=int)
    tls.add_server_args(p)
    tls.add_client_args(p, "worker-", "workers")
    configured = configure(p, RouterSettings, "router", argv)
    args = configured.args
    args.configured = configured
    args.tls = tls.server_tls(args, p)
    args.worker_tls = tls.client_tls(args, p, "worker-")
    try:
        args.auth = load_auth(configured.settings)
        args.worker_list = worker_list(configured.settings)
    except SettingsError as err:
        p.error(str(err))
    return args


def load_auth(settings: RouterSettings) -> Authenticator | None:
    path = settings.auth.auth_file
    try:
        return Authenticator.load(path) if path is not None else None
    except (OSError, ValueError) as err:
        raise SettingsError(f"router.auth.auth_file (--auth-file): {err}") from None


def worker_list(settings: RouterSettings) -> list[str]:
    workers = [w.strip() for w in settings.discovery.workers.split(",") if w.strip()]
    if not workers:
        raise SettingsError("router.discovery.workers (--workers): give at least one host:port")
    return workers


def check_reload(loaded: Loaded) -> None:
    """What the model alone cannot judge: the auth file must parse, the worker list must not be empty."""
    load_auth(loaded.settings)
    worker_list(loaded.settings)


def reloader(args: argparse.Namespace, service: RouterService, admission: Admission,
             discovery: Discovery) -> Reloader:
    async def apply(old: Loaded, new: Loaded) -> None:
        settings: RouterSettings = new.settings
        service.auth = load_auth(settings)
        a = settings.admission
        admission.resize(a.max_running_runs, a.max_queued_runs, a.max_runs_per_client)
        workers = worker_list(settings)
        if workers != discovery.specs:
            discovery.specs = workers
            await discovery.refresh()
            discovery.start()

    return Reloader(args.configured, apply, check=check_reload,
                    watched=lambda loaded: [p for p in [loaded.settings.auth.auth_file] if p is not None])


async def serve(args: argparse.Namespace) -> None:
    pool = WorkerPool([], routing=RoutingPolicy(args.routing, args.overlap_weight), tls=args.worker_tls)
    discovery = Discovery(pool, args.worker_list, args.discovery_interval)
    pool.sources = discovery.sources      # named in the message of a task no worker can take
    await discovery.refresh()
    pool.start()
    discovery.start()
    limits = Limits(max_n=args.max_n, max_tokens=args.max_tokens, max_prompt_chars=args.max_prompt_chars,
                    max_run_s=args.max_run_seconds, max_tasks_per_run=args.max_tasks_per_run)
    admission = Admission(args.max_running_runs, args.max_queued_runs, args.max_runs_per_client)
    service = RouterService(pool, limits, admission, args.auth, worker_wait_s=args.worker_wait_seconds,
                            max_migrations=args.max_migrations,
                            certainty=args.certainty if args.reallocate == "certaindex" else 0.0)
    served = await start_server(
        args.host, args.port, lambda server: router_pb2_grpc.add_RouterServicer_to_server(service, server),
        (router_pb2.DESCRIPTOR.services_by_name["Router"].full_name,), tls=args.tls,
        interceptors=(RefuseUndecodable(),))
    await served.set_serving(True)
    log.info("serving", port=served.port, workers=args.worker_list, pid=os.getpid())
    reloads = reloader(args, service, admission, discovery)
    reloads.start()
    try:
        await run_until_signalled(served, args.drain_seconds)
    finally:
        await reloads.close()
        await discovery.close()
        await pool.close()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    configure_logging("router")
    log_settings(args.configured.loaded, log)
    configure_tracing("router")
    metrics_port = configure_metrics("router", args.metrics_port, args.metrics_host)
    if metrics_port:
        log.info("metrics", url=f"http://{args.metrics_host}:{metrics_port}/metrics")
    try:
        asyncio.run(serve(args))
    finally:
        shutdown_telemetry()
