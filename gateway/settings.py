"""The gateway's settings: every flag of `python -m gateway`, in sections, defaults and bounds in one place."""

from __future__ import annotations

from trellis_settings import Section, setting
from trellis_settings.common import ServerTLS, Telemetry, client_tls


class Server(Section):
    host: str = setting("127.0.0.1", "interface to serve HTTP on", flag="host")
    port: int = setting(8080, "0 picks a free port (printed in the 'serving' line)", flag="port", ge=0, le=65535)
    drain_seconds: float = setting(30.0, "grace period for open requests on SIGTERM", flag="drain_seconds", ge=0)
    keep_alive_seconds: float = setting(
        75.0, "how long an idle client connection stays open; keep it above the idle timeout of any load balancer "
        "in front (60 s on common ones), or a reused connection may be closed under it", flag="keep_alive_seconds",
        gt=0)


class Requests(Section):
    max_choices: int = setting(16, "largest n (times prompts) of one request", flag="max_choices", ge=1)
    request_seconds: float = setting(0.0, "deadline of a request's runs on the router (0: none of the gateway's own)",
                                     flag="request_seconds", ge=0)


class Router(Section):
    address: str = setting("127.0.0.1:50051", "the router's host:port", flag="router", env="TRELLIS_ROUTER")


RouterTLS = client_tls("router-", "the router")


class GatewaySettings(Section):
    server: Server = Server()
    tls: ServerTLS = ServerTLS()
    router: Router = Router()
    router_tls: RouterTLS = RouterTLS()
    requests: Requests = Requests()
    telemetry: Telemetry = Telemetry()
