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
import os
import signal

import structlog
import uvicorn

from gateway.app import Gateway, build
from trellis_client import AsyncClient
from trellis_rpc import tls
from trellis_rpc.logs import configure_logging
from trellis_rpc.telemetry import add_metrics_args, configure_metrics, configure_tracing, shutdown_telemetry

log = structlog.get_logger("gateway")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m gateway", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--router", default=os.environ.get("TRELLIS_ROUTER", "127.0.0.1:50051"),
                   help="the router's host:port (env TRELLIS_ROUTER)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080, help="0 picks a free port (printed in the 'serving' line)")
    p.add_argument("--max-choices", type=int, default=16, help="largest n (times prompts) of one request")
    p.add_argument("--request-seconds", type=float, default=0.0,
                   help="deadline of a request's runs on the router (0: none of the gateway's own)")
    p.add_argument("--drain-seconds", type=float, default=30.0, help="grace period for open requests on SIGTERM")
    p.add_argument("--keep-alive-seconds", type=float, default=75.0,
                   help="how long an idle client connection stays open; keep it above the idle timeout of any load "
                        "balancer in front (60 s on common ones), or a reused connection may be closed under it")
    add_metrics_args(p)
    tls.add_server_args(p)
    tls.add_client_args(p, "router-", "the router")
    args = p.parse_args(argv)
    tls.server_tls(args, p)           # the same refusals as every Trellis server (half TLS, plaintext off loopback)
    args.router_tls = tls.client_tls(args, p, "router-")
    if args.max_choices < 1:
        p.error(f"--max-choices: must be >= 1, got {args.max_choices}")
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
    configure_tracing("gateway")
    configure_metrics("gateway", args.metrics_port, args.metrics_host)
    try:
        asyncio.run(serve(args))
    finally:
        shutdown_telemetry()
        log.info("stopped")
