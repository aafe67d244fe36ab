"""The HTTP routes: OpenAI's /v1/chat/completions, /v1/completions and /v1/models, and health."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import structlog
from opentelemetry import trace
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from gateway import openai_request, runs
from gateway import openai_response as shape_of
from gateway.errors import APIError, from_trellis
from gateway.metrics import GatewayMetrics
from gateway.run_plan import names_known, plan
from trellis_client import AsyncClient, Catalog, TrellisError
from trellis_rpc.telemetry import extract, tracer

log = structlog.get_logger("gateway")
CATALOG_TTL_S = 5.0     # workers come and go: the models listed are at most this old
CATALOGS_KEPT = 1024    # callers (tokens) whose catalog is cached


@dataclass
class Gateway:
    client: AsyncClient
    max_choices: int = 16
    deadline: float | None = None          # seconds a request's runs may take (None: no limit of the gateway's)
    metrics: GatewayMetrics = field(default_factory=GatewayMetrics)
    _catalogs: dict[str, tuple[float, Catalog]] = field(default_factory=dict)

    async def catalog(self, token: str, fresh: bool = False) -> Catalog:
        """The router's catalog as this caller sees it (its token decides which controllers it may run)."""
        cached = self._catalogs.get(token)
        if fresh or cached is None or time.monotonic() - cached[0] > CATALOG_TTL_S:
            try:
                catalog = await self.client.catalog(token=token)
            except TrellisError as err:
                raise from_trellis(err) from None
            if len(self._catalogs) >= CATALOGS_KEPT:
                self._catalogs.pop(next(iter(self._catalogs)))
            cached = self._catalogs[token] = (time.monotonic(), catalog)
        return cached[1]


def _token(request: Request) -> str:
    """The caller's bearer token, passed through to the router's auth."""
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" else ""


def _error(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers())


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone away (after the body, the server's receive() waits for exactly that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _body(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body())
    except ClientDisconnect:
        raise _Gone() from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise APIError(400, f"the body is not valid JSON: {err}") from None
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object")
    return body


@dataclass
class _Record:
    """One request's span, log line and metrics, finished once: when the response is sent, or for a stream when
    its last byte is (or the client leaves)."""
    gw: Gateway
    route: str
    span: trace.Span
    started: float = field(default_factory=time.monotonic)
    status: int = 500
    controller: str = ""
    choices: int = 0
    stream: bool = False

    def finish(self, status: int | None = None) -> None:
        if status is not None:
            self.status = status
        seconds = time.monotonic() - self.started
        with trace.use_span(self.span, end_on_exit=True):
            log.info("request", route=self.route, status=self.status, controller=self.controller,
                     choices=self.choices, stream=self.stream, ms=round(seconds * 1000, 1))
        self.gw.metrics.request(self.route, self.status, seconds)


async def _complete(gw: Gateway, request: Request, chat: bool) -> Response:
    route = "chat.completions" if chat else "completions"
    span = tracer("trellis.gateway").start_span(f"gateway {route}", context=extract(request.headers.items()),
                                               kind=trace.SpanKind.SERVER)
    record = _Record(gw, route, span)
    try:
        with trace.use_span(span, end_on_exit=False):
            body = await _body(request)
            choices = (openai_request.chat if chat else openai_request.completions)(body, gw.max_choices)
            token = _token(request)
            catalog = await gw.catalog(token)
            if not names_known(body.get("model"), catalog):    # a worker model that just joined, say
                catalog = await gw.catalog(token, fresh=True)
            run = plan(body.get("model"), body.get("trellis"), catalog)
            record.controller, record.choices = run.controller, len(choices.prompts) * choices.n
            span.set_attribute("trellis.controller", run.controller)
            shape = shape_of.Shape(chat, f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time()),
                                   body["model"])
            if choices.stream:
                opened = await _until_gone(request, runs.open_streams(gw.client, run, choices, token, gw.deadline))
                record.status, record.stream = 200, True
                body_ = runs.sse(shape, opened, run, choices, lambda: _disconnected(request), gw.metrics.chunks.add)
                return StreamingResponse(_finishing(body_, record), media_type="text/event-stream",
                                         headers={"cache-control": "no-cache", "x-accel-buffering": "no"})
            results = await _until_gone(request, runs.run_all(gw.client, run, choices, token, gw.deadline))
            record.status = 200
            return JSONResponse(shape_of.response(shape, results))
    except APIError as err:
        record.status = err.status
        span.set_status(trace.Status(trace.StatusCode.ERROR, err.message))
        return _error(err)
    except _Gone:
        record.status = 499     # nginx's "client closed request": nobody reads it, the log and metrics do
        return Response(status_code=499)
    finally:
        if not record.stream:
            record.finish()


class _Gone(Exception):
    pass


async def _until_gone(request: Request, work):
    """Run work unless the client disconnects first; then cancel it (which cancels its runs on the router)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait([task, gone], return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            task.cancel()
            raise _Gone()
        return task.result()
    finally:
        gone.cancel()


async def _finishing(body, record: _Record):
    gone = True
    try:
        with trace.use_span(record.span, end_on_exit=False):
            async for item in body:
                yield item
        gone = False
    finally:
        record.finish(499 if gone else 200)


def build(gw: Gateway) -> Starlette:
    async def chat_completions(request: Request) -> Response:
        return await _complete(gw, request, chat=True)

    async def completions(request: Request) -> Response:
        return await _complete(gw, request, chat=False)

    async def model_list(request: Request) -> list[dict[str, Any]]:
        catalog = await gw.catalog(_token(request), fresh=True)
        data = [{"id": c.name, "object": "model", "created": 0, "owned_by": "trellis",
                 "trellis": {"kind": "controller", "description": c.description,
                             "params": [{"name": p.name, "type": p.type, "default": p.default,
                                         "description": p.description} for p in c.params]}}
                for c in catalog.controllers]
        data += [{"id": m, "object": "model", "created": 0, "owned_by": "trellis",
                  "trellis": {"kind": "worker_model", "controller": "native_generation"}} for m in catalog.models]
        return data

    async def models(request: Request) -> Response:
        try:
            return JSONResponse({"object": "list", "data": await model_list(request)})
        except APIError as err:
            return _error(err)

    async def model(request: Request) -> Response:
        """GET /v1/models/{id}: one entry; the id may carry parameters (majority_vote?n=8 is majority_vote)."""
        wanted = request.path_params["model"]
        try:
            data = await model_list(request)
        except APIError as err:
            return _error(err)
        name = wanted.partition("?")[0].partition("@")[0]
        found = next((m for m in data if m["id"] == name), None)
        if found is None:
            return _error(APIError(404, f"model: {wanted!r} is neither a controller nor a served model",
                                   "invalid_request_error", "model", "model_not_found"))
        return JSONResponse({**found, "id": wanted})

    async def health(request: Request) -> Response:
        """Ready: the router answers SERVING. Kubernetes' readiness probe; /health/live is its liveness."""
        if await gw.client.serving(timeout=1.0):
            return JSONResponse({"status": "ok", "router": gw.client.address})
        return JSONResponse({"status": "unavailable", "router": gw.client.address,
                             "reason": "the router does not answer SERVING"}, status_code=503)

    async def live(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    return Starlette(routes=[
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{model:path}", model, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/health/live", live, methods=["GET"]),
    ])
