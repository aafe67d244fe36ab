"""Where and how to reach the router: its address, TLS, the bearer token, and the metadata every call carries."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import grpc

from trellis_rpc.telemetry import inject
from trellis_rpc.tls import ClientTLS

DEFAULT_ADDRESS = "127.0.0.1:50051"

# Channel options: fail fast on a router that is not there instead of waiting out the call's whole deadline
# for it, and keep idle streams alive through proxies and load balancers.
CHANNEL_OPTIONS = [("grpc.keepalive_time_ms", 30_000), ("grpc.keepalive_permit_without_calls", 1),
                   ("grpc.max_receive_message_length", 64 * 1024 * 1024)]


@dataclass(frozen=True)
class Target:
    address: str
    tls: ClientTLS | None = None
    token: str = ""

    @classmethod
    def of(cls, address: str | None, tls: ClientTLS | bool | str | Path | None, token: str | None) -> Target:
        """address: None reads TRELLIS_ROUTER. tls: a ClientTLS, True (the system's roots), or a CA file's path.
        token: None reads TRELLIS_TOKEN."""
        if tls is True:
            tls = ClientTLS()
        elif isinstance(tls, str | Path):
            tls = ClientTLS(ca=Path(tls))
        elif tls is False:
            tls = None
        return cls(address or os.environ.get("TRELLIS_ROUTER") or DEFAULT_ADDRESS, tls,
                   os.environ.get("TRELLIS_TOKEN", "") if token is None else token)

    def options(self) -> list[tuple[str, object]]:
        return CHANNEL_OPTIONS + (self.tls.options() if self.tls else [])

    def channel(self) -> grpc.Channel:
        if self.tls is None:
            return grpc.insecure_channel(self.address, options=self.options())
        return grpc.secure_channel(self.address, self.tls.credentials(), options=self.options())

    def aio_channel(self) -> grpc.aio.Channel:
        if self.tls is None:
            return grpc.aio.insecure_channel(self.address, options=self.options())
        return grpc.aio.secure_channel(self.address, self.tls.credentials(), options=self.options())

    def metadata(self, token: str | None = None) -> tuple[tuple[str, str], ...]:
        """The bearer token (a per-call one over the client's) and the caller's active trace context
        (traceparent), read at each call so the router's spans join the caller's trace."""
        token = self.token if token is None else token
        auth = (("authorization", f"Bearer {token}"),) if token else ()
        return auth + tuple(inject().items())
