"""The HTTP side: one pooled httpx client to the upstream's OpenAI-compatible API.

httpx rather than the openai SDK: the worker needs the raw SSE stream (vendor fields such as vLLM's token ids
and llama.cpp's extras survive), closing a response to abort the upstream's request at once, and statuses it
maps to gRPC codes itself; the SDK would add retries and typed models it would then have to undo.

Errors become StatusErrors: 429 -> RESOURCE_EXHAUSTED (with the upstream's Retry-After), 5xx and broken
connections -> UNAVAILABLE (the router migrates the task), 400/404/422 -> INVALID_ARGUMENT with the upstream's
message, 401 -> UNAUTHENTICATED, 403 -> PERMISSION_DENIED. A request is retried only before anything streamed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import httpx
import structlog

from trellis_rpc.errors import StatusError, resource_exhausted, unavailable

log = structlog.get_logger(__name__)

RETRYABLE = (502, 503, 504)


@dataclass(frozen=True)
class UpstreamConfig:
    base_url: str                     # ends in /v1 (or whatever prefix the upstream serves the API under)
    api_key: str = ""
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 600.0     # between two chunks of a stream; a task's deadline cuts it shorter
    retries: int = 2                  # attempts after the first, only while nothing has streamed
    retry_backoff_s: float = 0.2
    max_connections: int = 256


def _message(response_text: str) -> str:
    """The upstream's own error message: OpenAI's {"error": {"message"}}, FastAPI's {"detail"}, or the text."""
    try:
        body = json.loads(response_text)
    except ValueError:
        return response_text.strip()[:500]
    if isinstance(body, dict):
        err = body.get("error", body.get("detail", body.get("message")))
        if isinstance(err, dict):
            err = err.get("message", err)
        if err is not None:
            return str(err)[:500]
    return response_text.strip()[:500]


def status_error(status: int, text: str, retry_after: str | None = None) -> StatusError:
    message = f"upstream answered HTTP {status}: {_message(text)}"
    if status == 429:
        if retry_after:
            message += f" (retry after {retry_after} s)"
        return resource_exhausted(message)
    if status == 401:
        return StatusError(grpc.StatusCode.UNAUTHENTICATED, message)
    if status == 403:
        return StatusError(grpc.StatusCode.PERMISSION_DENIED, message)
    if status in (400, 404, 413, 422):
        return StatusError(grpc.StatusCode.INVALID_ARGUMENT, message)
    if status == 408:
        return StatusError(grpc.StatusCode.DEADLINE_EXCEEDED, message)
    return unavailable(message)


def transport_error(exc: httpx.HTTPError) -> StatusError:
    if isinstance(exc, httpx.TimeoutException):
        return unavailable(f"upstream timed out ({type(exc).__name__})")
    return unavailable(f"upstream unreachable: {type(exc).__name__}: {exc}")


class Upstream:
    def __init__(self, config: UpstreamConfig) -> None:
        self.config = config
        headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        self.client = httpx.AsyncClient(
            base_url=config.base_url.rstrip("/") + "/", headers=headers,
            timeout=httpx.Timeout(config.read_timeout_s, connect=config.connect_timeout_s),
            limits=httpx.Limits(max_connections=config.max_connections,
                                max_keepalive_connections=config.max_connections))

    async def close(self) -> None:
        await self.client.aclose()

    async def get(self, url: str, timeout_s: float = 5.0) -> httpx.Response:
        """GET a path under the base URL, or an absolute URL; StatusError unless it answers 200."""
        try:
            response = await self.client.get(url, timeout=timeout_s)
        except httpx.HTTPError as exc:
            raise transport_error(exc) from exc
        if response.status_code != 200:
            raise status_error(response.status_code, response.text, response.headers.get("retry-after"))
        return response

    async def get_json(self, path: str, timeout_s: float = 5.0) -> dict:
        response = await self.get(path, timeout_s)
        try:
            return response.json()
        except ValueError as exc:
            raise unavailable(f"upstream's {path} is not JSON") from exc

    async def post_json(self, path: str, body: dict, headers: dict[str, str] | None = None) -> dict:
        response = await self._send(path, body, headers, stream=False)
        try:
            return response.json()
        except ValueError as exc:
            raise unavailable(f"upstream's {path} answered with something other than JSON") from exc

    @contextlib.asynccontextmanager
    async def stream(self, path: str, body: dict, headers: dict[str, str] | None = None
                     ) -> AsyncIterator[AsyncIterator[dict]]:
        """POST with stream=true and yield the SSE events as dicts. Leaving the block closes the response, which
        makes the upstream abort the request (vLLM, SGLang, llama.cpp and transformers serve all watch for the
        client going away)."""
        response = await self._send(path, body, headers, stream=True)
        try:
            yield self._events(response)
        finally:
            await response.aclose()

    async def _send(self, path: str, body: dict, headers: dict[str, str] | None, stream: bool) -> httpx.Response:
        """POST until the upstream answers 200; retried only on a failed connection or 502/503/504, before any
        of the answer was read. A streamed response is returned unread (the caller closes it)."""
        err: StatusError | None = None
        for attempt in range(self.config.retries + 1):
            request = self.client.build_request("POST", path, json=body, headers=headers)
            try:
                response = await self.client.send(request, stream=stream)
            except httpx.HTTPError as exc:
                err = transport_error(exc)
            else:
                if response.status_code == 200:
                    return response
                text = (await response.aread()).decode("utf-8", "replace")
                await response.aclose()
                err = status_error(response.status_code, text, response.headers.get("retry-after"))
                if response.status_code not in RETRYABLE:
                    raise err
            if attempt < self.config.retries:
                log.debug("upstream retry", path=path, attempt=attempt + 1, error=err.message)
                await asyncio.sleep(self.config.retry_backoff_s * 2**attempt)
        raise err

    @staticmethod
    async def _events(response: httpx.Response) -> AsyncIterator[dict]:
        try:
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                try:
                    event = json.loads(data)
                except ValueError as exc:
                    raise unavailable(f"upstream sent a malformed event: {data[:200]!r}") from exc
                if isinstance(event, dict) and "error" in event:
                    # An error after the stream started (vLLM, transformers serve): the request is lost upstream.
                    raise unavailable(f"upstream failed mid-stream: {_message(data)}")
                yield event
        except httpx.HTTPError as exc:
            raise transport_error(exc) from exc
