"""The OpenAI-compatible gateway's cost: time to first token through it against the same run over gRPC (the
Python library, same router, same worker, interleaved one by one), and what one gateway process streams to 64
concurrent clients.

    .venv/bin/python -m benchmarks.gateway [--ttft-runs 300] [--clients 64] [--seconds 20] [--step-ms 0]

The worker is the real worker service over ConstantSpeedEngine (benchmarks/fake_engine.py, one token per
--step-ms, 0: as fast as it can), so what is measured is the hops, not a model. Every process shares this
machine's cores with the client driving them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time

from benchmarks.openai_worker import cpu_line
from benchmarks.router import LOGS, cpu_seconds, fake_worker, pct
from benchmarks.sse_client import SSEConnection
from client.launcher import start_gateway, start_router
from trellis_client import AsyncClient, Delta

MESSAGES = [{"role": "user", "content": "Tell me a story."}]


async def grpc_ttft(client: AsyncClient, max_tokens: int) -> float:
    start = time.perf_counter()
    async with client.stream("native_generation", "Tell me a story.", sampling={"max_tokens": max_tokens}) as events:
        async for event in events:
            if isinstance(event, Delta) and event.text:
                ttft = time.perf_counter() - start
                break
    return ttft


async def http_ttft(http: SSEConnection, max_tokens: int) -> float:
    body = {"model": "native_generation", "messages": MESSAGES, "max_tokens": max_tokens, "stream": True}
    start = time.perf_counter()
    ttft = None
    async for data in http.post("/v1/chat/completions", body):   # read to the end: the connection is reused
        if ttft is None and b'"content":"' in data and b'"content":""' not in data:
            ttft = time.perf_counter() - start
    if ttft is None:
        raise RuntimeError("no content chunk")
    return ttft


async def ttft(router: str, gateway: str, runs: int, max_tokens: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"grpc": [], "gateway": []}
    host, port = gateway.rsplit(":", 1)
    http = SSEConnection(host, int(port))
    async with AsyncClient(router) as client:
        for _ in range(10):                       # warm both paths (connections, caches)
            await grpc_ttft(client, max_tokens)
            await http_ttft(http, max_tokens)
        for i in range(runs):                     # interleaved, alternating who goes first
            pair = [("grpc", grpc_ttft(client, max_tokens)), ("gateway", http_ttft(http, max_tokens))]
            for name, call in (pair if i % 2 == 0 else pair[::-1]):
                out[name].append(await call)
    http.close()
    return out


async def fan_out(gateway: str, router: str, clients: int, seconds: float, max_tokens: int,
                  through_gateway: bool, pids: dict[str, int]) -> dict[str, float]:
    """clients concurrent streaming clients, each starting a new request as soon as its last one ends. Also the
    CPU each process spent per second (who is the bottleneck on this machine's cores)."""
    chunks = tokens = requests = errors = 0
    stop = time.monotonic() + seconds

    async def one_http() -> None:
        nonlocal chunks, tokens, requests, errors
        body = {"model": "native_generation", "messages": MESSAGES, "max_tokens": max_tokens, "stream": True,
                "stream_options": {"include_usage": True}}
        host, port = gateway.rsplit(":", 1)
        http = SSEConnection(host, int(port))
        while time.monotonic() < stop:
            try:
                async for data in http.post("/v1/chat/completions", body):
                    if data.startswith(b"{"):
                        chunks += 1
                        if b'"choices":[]' in data:
                            tokens += json.loads(data)["usage"]["completion_tokens"]
            except (OSError, RuntimeError, asyncio.IncompleteReadError):
                errors += 1
                http.close()
                http = SSEConnection(host, int(port))
                continue
            requests += 1
        http.close()

    async def one_grpc(client: AsyncClient) -> None:
        nonlocal chunks, tokens, requests
        while time.monotonic() < stop:
            async for event in client.stream("native_generation", "Tell me a story.",
                                             sampling={"max_tokens": max_tokens}):
                chunks += 1
                if isinstance(event, Delta):
                    tokens += event.token_count
            requests += 1

    names = list(pids) + ["driver"]
    cpu_before = cpu_seconds((*pids.values(), os.getpid()))
    started = time.monotonic()
    if through_gateway:
        await asyncio.gather(*(one_http() for _ in range(clients)))
    else:
        async with AsyncClient(router) as client:
            await asyncio.gather(*(one_grpc(client) for _ in range(clients)))
    wall = time.monotonic() - started
    cpu = [(b - a) / wall for a, b in zip(cpu_before, cpu_seconds((*pids.values(), os.getpid())), strict=True)]
    return {"chunks_s": chunks / wall, "tokens_s": tokens / wall, "requests_s": requests / wall, "errors": errors,
            "cpu": ", ".join(f"{n} {c:.2f}" for n, c in zip(names, cpu, strict=True))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ttft-runs", type=int, default=300)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per request in the fan-out")
    p.add_argument("--step-ms", type=float, default=0.0, help="the fake worker's time per token step")
    args = p.parse_args()
    print(cpu_line(), flush=True)
    worker = fake_worker(args.step_ms)
    worker.wait_serving(60)
    router = start_router([worker.address], LOGS, name="bench-router", env={"TRELLIS_LOG_LEVEL": "WARNING"})
    router.wait_serving(60)
    gateway = start_gateway(router.address, LOGS, name="bench-gateway", env={"TRELLIS_LOG_LEVEL": "WARNING"})
    gateway.wait_serving(60)
    try:
        t = asyncio.run(ttft(router.address, gateway.address, args.ttft_runs, 4))
        g, h = t["grpc"], t["gateway"]
        print(f"\nTime to first token, native_generation, {args.ttft_runs} runs each, interleaved "
              f"(fake worker, step {args.step_ms} ms):")
        print("| path | p50 | p90 | p99 |\n|---|---|---|---|")
        for name, values in (("gRPC (trellis_client.AsyncClient)", g), ("gateway (HTTP + SSE)", h)):
            print(f"| {name} | {statistics.median(values) * 1000:.2f} ms | {pct(values, 0.9) * 1000:.2f} ms | "
                  f"{pct(values, 0.99) * 1000:.2f} ms |")
        added = (statistics.median(h) - statistics.median(g)) * 1000
        print(f"added TTFT p50: {added:.2f} ms (target <= 2 ms: {'met' if added <= 2 else 'MISSED'})")

        print(f"\n{args.clients} concurrent streaming clients, {args.max_tokens} tokens per request, "
              f"{args.seconds:.0f} s each:")
        print("| path | chunks/s | tokens/s | requests/s | errors | CPU cores used per process |\n"
              "|---|---|---|---|---|---|")
        for name, via in (("gRPC (AsyncClient.stream events)", False), ("gateway (SSE chunks)", True)):
            pids = {"worker": worker.popen.pid, "router": router.popen.pid}
            if via:
                pids["gateway"] = gateway.popen.pid
            r = asyncio.run(fan_out(gateway.address, router.address, args.clients, args.seconds, args.max_tokens, via,
                                    pids))
            print(f"| {name} | {r['chunks_s']:.0f} | {r['tokens_s']:.0f} | {r['requests_s']:.1f} | "
                  f"{r['errors']:.0f} | {r['cpu']} |", flush=True)
            if via:
                print(f"gateway chunks/s: {r['chunks_s']:.0f} (target >= 1000: "
                      f"{'met' if r['chunks_s'] >= 1000 else 'MISSED'})")
    finally:
        for proc in (gateway, router, worker):
            proc.stop()


if __name__ == "__main__":
    main()
