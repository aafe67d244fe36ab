"""Following the upstream's health: trellis.v1.Worker is SERVING while the upstream answers and NOT_SERVING while
it does not (routers and readiness probes ask that service); "" stays SERVING, so a liveness probe does not
restart a worker that is fine while its upstream restarts."""

from __future__ import annotations

import asyncio

import grpc
import structlog

from trellis_rpc.errors import StatusError
from trellis_rpc.server import Served
from worker_openai.upstream import Upstream

log = structlog.get_logger(__name__)

REFUSED_KEY = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


class UpstreamHealth:
    """Probes the upstream's health URL every interval_s; a refused API key raises (a configuration error)."""

    def __init__(self, upstream: Upstream, served: Served, interval_s: float, url: str) -> None:
        self.upstream = upstream
        self.served = served
        self.interval_s = interval_s
        self.url = url
        self.up: bool | None = None
        self.stopping = False

    async def models(self) -> list[str]:
        """The model ids the upstream lists, [] when it lists none it can say; raises a refused key. This is
        where a bad key shows at start: /health needs no key on the servers that have one."""
        try:
            listing = await self.upstream.get_json("models")
        except StatusError as err:
            if err.code in REFUSED_KEY:
                raise
            log.warning("the upstream's /models did not answer", error=err.message)
            return []
        return [m.get("id", "") for m in listing.get("data") or [] if isinstance(m, dict)]

    async def check(self) -> None:
        """StatusError unless the upstream answers. A server without /health (llama-cpp-python's) is followed
        through <base-url>/models instead, from its first 404 on."""
        try:
            await self.upstream.get(self.url)
        except StatusError as err:
            if "HTTP 404" not in err.message or self.url.endswith("/models"):
                raise
            self.url = self.upstream.config.base_url.rstrip("/") + "/models"
            log.info("the upstream has no /health: following /models", health_url=self.url)
            await self.upstream.get(self.url)

    async def wait_until_up(self) -> None:
        while True:
            try:
                await self.check()
                return
            except StatusError as err:
                if err.code in REFUSED_KEY:
                    raise
                log.warning("upstream not answering yet", health_url=self.url, error=err.message)
            await asyncio.sleep(self.interval_s)

    async def follow(self) -> None:
        while not self.stopping:
            await asyncio.sleep(self.interval_s)
            try:
                await self.check()
                up, reason = True, ""
            except StatusError as err:
                if err.code in REFUSED_KEY:
                    raise
                up, reason = False, err.message
            if up != self.up and not self.stopping:
                self.up = up
                await self.served.set_serving(up, services_only=True)
                if up:
                    log.info("upstream back: serving")
                else:
                    log.warning("upstream down: not serving", error=reason)
