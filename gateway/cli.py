"""python -m gateway: an OpenAI-compatible HTTP gateway in front of a Trellis router.

    python -m gateway --router 127.0.0.1:50051 --port 8080
    curl -N localhost:8080/v1/chat/completions -H 'content-type: application/json' \\
      -d '{"model": "majority_vote?n=8", "stream": true, "messages": [{"role": "user", "content": "What is 9*3?"}]}'

It is a gRPC client of the router (through trellis_client), so it scales on its own and the router stays
gRPC-only. The caller's bearer token goes through to the router's auth; its traceparent joins the trace.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import structlog
import uvicorn

from gateway.app import Gateway, build
from gateway.settings import GatewaySettings
from trellis_client import AsyncClient
from trellis_rpc import tls
from trellis_rpc.logs import configure_logging
from trellis_rpc.telemetry import add_metrics_args, configure_metrics, configure_tracing, shutdown_telemetry
from trellis_settings import configure
from trellis_settings.parser import log_settings

log = structlog.get_logger("gateway")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m gateway", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--router", help="the router's host:port (env TRELLIS_ROUTER)")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--max-choices", type=int)
    p.add_argument("--request-seconds", type=float)
    p.add_argument("--drain-seconds", type=float)
    p.add_argument("--keep-alive-seconds", type=float)
    add_metrics_args(p)
    tls.add_server_args(p)
    tls.add_client_args(p, "router-", "the router")
    configured = configure(p, GatewaySettings, "gateway", argv)    # defaults, bounds and help: gateway/settings.py
    args = configured.args
    args.configured = configured
    tls.server_tls(args, p)           # the same refusals as every Trellis server (half TLS, plaintext off loopback)
    args.router_tls = tls.client_tls(args, p, "router-")
    return args


def ssl_options(args: argparse.Namespace) -> dict:
    if not args.tls_cert:
        return {}
    import ssl
    out = {"ssl_certfile": str(args.tls_cert), "ssl_keyfile": str(args.tls_key)}
    if args.tls_client_ca:
        out |= {"ssl_ca_certs": str(args.tls_client_ca), "ssl_cert_reqs": ssl.CERT_REQUIRED}
    return out


async def serve(args: argparse.Namespace) -> None:
    client = AsyncClient(args.router, tls=args.router_tls, token="")
    gateway = Gateway(client, max_choices=args.max_choices, deadline=args.request_seconds or None)
    config = uvicorn.Config(build(gateway), host=args.host, port=args.port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=int(args.drain_seconds), lifespan="off",
                            timeout_keep_alive=args.keep_alive_seconds, **ssl_options(args))
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None      # ours below: drain on SIGTERM, as the other processes do
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: setattr(server, "should_exit", True))
    serving = asyncio.create_task(server.serve())
    while not server.started and not serving.done():
        await asyncio.sleep(0.02)
    if server.started:
        port = server.servers[0].sockets[0].getsockname()[1]
        log.info("serving", host=args.host, port=port, router=args.router, tls=bool(args.tls_cert))
    try:
        await serving
    finally:
        await client.close()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    configure_logging("gateway")
    log_settings(args.configured.loaded, log)
    configure_tracing("gateway")
    configure_metrics("gateway", args.metrics_port, args.metrics_host)
    try:
        asyncio.run(serve(args))
    finally:
        shutdown_telemetry()
        log.info("stopped")
