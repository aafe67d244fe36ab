"""gRPC server plumbing every Trellis process shares: health, reflection and drain on SIGTERM."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from trellis_rpc.tls import ServerTLS

log = structlog.get_logger(__name__)

# Messages carry whole token lists and logprobs; the 4 MiB default is too small for long outputs.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    # grpcio 1.85 times an unanswered keepalive ping out by this, not keepalive_timeout_ms (default 60 s).
    ("grpc.http2.ping_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
SERVER_OPTIONS = CHANNEL_OPTIONS + [("grpc.http2.min_ping_interval_without_data_ms", 5_000)]


@dataclass
class Served:
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    services: tuple[str, ...]
    port: int

    async def set_serving(self, serving: bool, services_only: bool = False) -> None:
        """services_only: the named services, leaving "" (the process itself, what a liveness probe asks) as
        it is: a worker whose backend is down is not ready, but restarting it would not help."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in self.services if services_only else ("", *self.services):
            await self.health.set(name, status)


async def start_server(host: str, port: int, register: Callable[[grpc.aio.Server], None],
                       service_names: tuple[str, ...], tls: ServerTLS | None = None,
                       interceptors: tuple[grpc.aio.ServerInterceptor, ...] = ()) -> Served:
    """Start a server NOT_SERVING; the caller flips it to SERVING once it can do its job. tls: serve TLS
    (mutual when it names a client CA); None: plaintext (the CLIs allow that on loopback or when asked)."""
    server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=interceptors)
    register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    address = f"{host}:{port}"
    bound = server.add_secure_port(address, tls.credentials()) if tls else server.add_insecure_port(address)
    if bound == 0:
        raise RuntimeError(f"cannot listen on {host}:{port}")
    await server.start()
    served = Served(server, health_servicer, service_names, bound)
    await served.set_serving(False)
    return served


async def run_until_signalled(served: Served, grace_s: float) -> None:
    """Serve until SIGTERM/SIGINT, then drain: NOT_SERVING at once, in-flight RPCs get grace_s to finish."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    waiter = asyncio.ensure_future(served.server.wait_for_termination())
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if stop.is_set():
        log.info("draining", grace_s=grace_s)
        await served.set_serving(False)
        await served.server.stop(grace_s)
    stopper.cancel()
    waiter.cancel()
