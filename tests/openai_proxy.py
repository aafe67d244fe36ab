"""A fault-injecting HTTP proxy in front of a real OpenAI-compatible server, for worker_openai's fault tests.

    python -m tests.openai_proxy --port P --upstream http://127.0.0.1:8000

Every request is forwarded to the upstream as is (streams included) unless /_control says otherwise:
POST /_control {"fail_status": 429, "fail_count": 2} answers the next two requests with 429; {"delay_s": 3}
holds every request that long before forwarding; {"chunk_delay_s": 1} holds each streamed chunk; {"api_key":
"k"} answers 401 to requests without "Bearer k" (as vLLM's --api-key does). GET /_control returns the state
plus what the proxy saw: requests, open streams (a stream closes when the client goes away), and the last
request's traceparent header. The upstream does the real work: this only adds what it cannot be made to do.
"""

from __future__ import annotations

import argparse
import asyncio

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

state: dict = {"fail_status": 0, "fail_count": 0, "delay_s": 0.0, "chunk_delay_s": 0.0, "api_key": "",
               "requests": 0, "open_streams": 0, "streams_closed": 0, "traceparent": "", "bodies": []}
client: httpx.AsyncClient | None = None


async def control(request: Request) -> Response:
    if request.method == "POST":
        state.update(await request.json())
    return JSONResponse(state)


async def forward(request: Request) -> Response:
    path = request.url.path
    if path == "/health":   # faults are injected into the API, not into the liveness probe
        upstream = await client.get(path)
        return Response(upstream.content, status_code=upstream.status_code)
    state["requests"] += 1
    if state["api_key"] and request.headers.get("authorization") != f"Bearer {state['api_key']}":
        return JSONResponse({"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}},
                            status_code=401)
    if state["fail_count"] > 0:
        state["fail_count"] -= 1
        headers = {"retry-after": "2"} if state["fail_status"] == 429 else {}
        return JSONResponse({"error": {"message": f"injected {state['fail_status']}"}},
                            status_code=state["fail_status"], headers=headers)
    if state["delay_s"]:
        await asyncio.sleep(state["delay_s"])
    body = await request.body()
    if request.method == "POST":
        state["bodies"] = (state["bodies"] + [body.decode()])[-20:]
    state["traceparent"] = request.headers.get("traceparent", "")
    upstream = await client.send(client.build_request(request.method, path, content=body,
                                                      headers={"content-type": "application/json"}), stream=True)

    async def relay():
        state["open_streams"] += 1
        try:
            async for chunk in upstream.aiter_raw():
                if state["chunk_delay_s"]:
                    await asyncio.sleep(state["chunk_delay_s"])
                yield chunk
        finally:
            state["open_streams"] -= 1
            state["streams_closed"] += 1
            await upstream.aclose()   # the client went away: so does the request upstream

    return StreamingResponse(relay(), status_code=upstream.status_code,
                             media_type=upstream.headers.get("content-type"))


def main() -> None:
    global client
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True)
    args = p.parse_args()
    client = httpx.AsyncClient(base_url=args.upstream, timeout=httpx.Timeout(600.0, connect=5.0))
    app = Starlette(routes=[Route("/_control", control, methods=["GET", "POST"]),
                            Route("/{path:path}", forward, methods=["GET", "POST"])])
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
