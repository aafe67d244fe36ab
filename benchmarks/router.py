"""The router's own cost, and what KV-aware routing buys.

    .venv/bin/python -m benchmarks.router                     # all parts
    .venv/bin/python -m benchmarks.router --only overhead,throughput
    .venv/bin/python -m benchmarks.router --only routing --workers 4
    .venv/bin/python -m benchmarks.router --only telemetry

overhead:   one task at a time, max_tokens 1, through the router (Router.Generate) against the same
            task sent straight to the worker on a Connect stream: the added latency p50 / p99.
throughput: 64 concurrent Router.Generate calls (1 token each): tasks/s; and RunStream runs of
            native_generation streaming 64 tokens each, 32 concurrent: token messages/s to clients.
            Both over a worker running the real worker service on a constant-speed fake engine, so
            only the router and the transport are measured.
routing:    4 real CPU workers (SmolLM2-135M, bf16, 1 thread each) behind a router with the KV-aware
            policy and behind one with round robin; runs that share long document prefixes (8
            documents x 6 questions, shuffled, 4 in flight): prefix-cache hit rate (cached / prompt
            tokens, from the workers' own counts) and TTFT p50 (a 1-token answer's latency). Each
            policy gets its own documents so neither inherits the other's cache.
telemetry:  overhead and throughput again with telemetry off, on (router and worker trace every task
            and export every span by OTLP to a collector process; Prometheus endpoints up) and
            sampled (10% of traces): the cost of observability in throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import grpc

from client.launcher import _spawn, free_port, start_router, start_worker
from trellis_client import AsyncClient, Sampling
from trellis_rpc.server import CHANNEL_OPTIONS
from trellis_rpc.v1 import common_pb2, router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc

LOGS = Path(tempfile.mkdtemp(prefix="trellis-bench-router-"))


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def fake_worker(step_ms: float = 0.0, env: dict[str, str] | None = None, extra: list[str] | None = None):
    port = free_port()
    return _spawn(f"fake-worker-{port}", "benchmarks.fake_worker",
                  ["--port", str(port), "--step-ms", str(step_ms), *(extra or [])], port, "trellis.v1.Worker",
                  LOGS, env)


# ---- overhead -----------------------------------------------------------------------------------

async def direct_latencies(address: str, count: int) -> list[float]:
    """One task at a time on one Connect stream, as the router itself talks to a worker."""
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        outbox: asyncio.Queue = asyncio.Queue()

        async def requests():
            while (item := await outbox.get()) is not None:
                yield item

        call = stub.Connect(requests())
        latencies = []
        for i in range(count):
            start = time.perf_counter()
            outbox.put_nowait(worker_pb2.WorkerRequest(task_id=f"d{i}", generate=worker_pb2.GenerateTask(
                prompt=common_pb2.Prompt(text="x"), sampling=common_pb2.SamplingParams(max_tokens=1))))
            async for response in call:
                if response.WhichOneof("kind") == "generate_result":
                    break
            latencies.append(time.perf_counter() - start)
        outbox.put_nowait(None)
        call.cancel()
        return latencies


async def router_latencies(address: str, count: int) -> list[float]:
    # Raw stubs, not trellis_client: compared with the raw worker stream above, so only the router's hop differs.
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        request = router_pb2.GenerateRequest(prompt=common_pb2.Prompt(text="x"),
                                             sampling=common_pb2.SamplingParams(max_tokens=1))
        latencies = []
        for _ in range(count):
            start = time.perf_counter()
            await stub.Generate(request, timeout=30)
            latencies.append(time.perf_counter() - start)
        return latencies


# ---- throughput ---------------------------------------------------------------------------------

async def tasks_per_s(address: str, total: int, concurrency: int) -> float:
    # Raw stubs, not trellis_client: only the router and the transport are measured, the client shares the cores.
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        request = router_pb2.GenerateRequest(prompt=common_pb2.Prompt(text="x"),
                                             sampling=common_pb2.SamplingParams(max_tokens=1))
        sem = asyncio.Semaphore(concurrency)

        async def one():
            async with sem:
                await stub.Generate(request, timeout=60)

        start = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(total)))
        return total / (time.perf_counter() - start)


async def token_messages_per_s(address: str, runs: int, tokens: int, concurrency: int) -> tuple[float, float]:
    """(delta messages/s, tokens/s) streamed to clients; the router merges a branch's deltas that queue up
    behind a slow reader, so a message may carry several tokens."""
    # Raw stubs, not trellis_client: only the router and the transport are measured, the client shares the cores.
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        request = router_pb2.RunRequest(controller="native_generation", prompt=common_pb2.Prompt(text="x"),
                                        sampling=common_pb2.SamplingParams(max_tokens=tokens), stream_tokens=True)
        sem = asyncio.Semaphore(concurrency)
        deltas = tokens_seen = 0

        async def one():
            nonlocal deltas, tokens_seen
            async with sem:
                async for event in stub.RunStream(request, timeout=60):
                    if event.WhichOneof("event") == "delta":
                        deltas += 1
                        tokens_seen += event.delta.token_count

        start = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(runs)))
        wall = time.perf_counter() - start
        return deltas / wall, tokens_seen / wall


# ---- telemetry cost -----------------------------------------------------------------------------

def telemetry_env(mode: str, collector_port: int) -> tuple[dict[str, str], bool]:
    """(environment, metrics on) of the router and the worker for one telemetry mode."""
    if mode == "off":
        return {"OTEL_TRACES_EXPORTER": "none"}, False
    env = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{collector_port}",
           "OTEL_EXPORTER_OTLP_INSECURE": "true"}
    if mode == "sampled":
        env |= {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"}
    return env, True


def cpu_seconds(pids: tuple[int, ...]) -> list[float]:
    """User + system CPU time of each process so far (Linux /proc): a cost measure the noisy machine's
    scheduling does not blur the way throughput is blurred."""
    out = []
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        out.append((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))
    return out


def telemetry_round(mode: str, collector_port: int, tasks: int) -> dict[str, float]:
    env, with_metrics = telemetry_env(mode, collector_port)
    metrics = (lambda: ["--metrics-port", str(free_port())]) if with_metrics else (lambda: [])
    worker = fake_worker(env=env, extra=metrics())
    worker.wait_serving(30)
    router = start_router([worker.address], LOGS, name=f"bench-router-{mode}", env=env,
                          extra=["--max-running-runs", "0", *metrics(), "--metrics-host", "127.0.0.1"])
    router.wait_serving(60)
    pids = (router.popen.pid, worker.popen.pid)
    try:
        asyncio.run(router_latencies(router.address, 50))  # warm-up
        latencies = asyncio.run(router_latencies(router.address, tasks))
        cpu = cpu_seconds(pids)
        per_s = asyncio.run(tasks_per_s(router.address, 2000, 64))
        task_cpu = [(b - a) / 2000 * 1e6 for a, b in zip(cpu, cpu_seconds(pids), strict=True)]
        cpu = cpu_seconds(pids)
        msgs, tokens = asyncio.run(token_messages_per_s(router.address, 256, 64, 32))
        run_cpu = [(b - a) / 256 * 1e6 for a, b in zip(cpu, cpu_seconds(pids), strict=True)]
        return {"p50_ms": pct(latencies, 0.5) * 1000, "tasks_s": per_s, "msgs_s": msgs, "tokens_s": tokens,
                "task_cpu_router_us": task_cpu[0], "task_cpu_worker_us": task_cpu[1],
                "run_cpu_router_us": run_cpu[0], "run_cpu_worker_us": run_cpu[1]}
    finally:
        router.stop()
        worker.stop()


def part_telemetry(args) -> None:
    """The same router workload with telemetry off, fully on (every span exported by OTLP to a collector
    process, metrics endpoints up) and sampled (10% of traces), modes interleaved within each repeat."""
    port = free_port()
    sink = _spawn("otlp-sink", "benchmarks.otlp_sink", ["--port", str(port)], port, "", LOGS, None)
    modes = ("off", "on", "sampled")
    rows: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    try:
        time.sleep(1.0)
        for _ in range(args.repeats):
            for mode in modes:
                rows[mode].append(telemetry_round(mode, port, args.tasks))
    finally:
        sink.stop()
    print(f"\n### Telemetry cost (medians of {args.repeats}, modes interleaved; OTLP to a collector process)\n")
    print("| telemetry | router p50 | tasks/s | vs off | tokens/s (RunStream) | vs off |")
    print("|---|---|---|---|---|---|")
    med = {m: {k: statistics.median(r[k] for r in rows[m]) for k in rows[m][0]} for m in modes}
    for m in modes:
        print(f"| {m} | {med[m]['p50_ms']:.2f} ms | {med[m]['tasks_s']:,.0f} | "
              f"{med[m]['tasks_s'] / med['off']['tasks_s']:.2f}x | {med[m]['tokens_s']:,.0f} "
              f"| {med[m]['tokens_s'] / med['off']['tokens_s']:.2f}x |")
    print("\nCPU time per task (Router.Generate) and per run (RunStream, 64 tokens), router + worker process:\n")
    print("| telemetry | router / task | worker / task | vs off | router / run | worker / run | vs off |")
    print("|---|---|---|---|---|---|---|")
    for m in modes:
        task = med[m]["task_cpu_router_us"] + med[m]["task_cpu_worker_us"]
        run = med[m]["run_cpu_router_us"] + med[m]["run_cpu_worker_us"]
        task_off = med["off"]["task_cpu_router_us"] + med["off"]["task_cpu_worker_us"]
        run_off = med["off"]["run_cpu_router_us"] + med["off"]["run_cpu_worker_us"]
        print(f"| {m} | {med[m]['task_cpu_router_us']:.0f} us | {med[m]['task_cpu_worker_us']:.0f} us | "
              f"{task / task_off:.2f}x | {med[m]['run_cpu_router_us']:.0f} us | {med[m]['run_cpu_worker_us']:.0f} us | "
              f"{run / run_off:.2f}x |")


# ---- routing quality ----------------------------------------------------------------------------

def documents(seed: int, count: int, words: int) -> list[str]:
    rng = random.Random(seed)
    vocab = ("river stone market winter letter garden engine signal harbor forest ledger candle orbit "
             "meadow copper lantern silver bridge valley thunder").split()
    return [f"Document {seed}-{d}: " + " ".join(rng.choice(vocab) for _ in range(words)) for d in range(count)]


async def routing_run(address: str, seed: int, concurrency: int) -> tuple[float, float, list[float]]:
    docs = documents(seed, 8, 260)
    questions = [f"{doc}\n\nQuestion {q}: which word comes first?" for doc in docs for q in range(6)]
    random.Random(seed).shuffle(questions)
    async with AsyncClient(address) as client:
        sem = asyncio.Semaphore(concurrency)
        prompt_tokens = cached = 0
        ttfts: list[float] = []

        async def one(text: str):
            nonlocal prompt_tokens, cached
            async with sem:
                start = time.perf_counter()
                result = await client.generate(text, sampling=Sampling(max_tokens=1, temperature=0), deadline=300)
                ttfts.append(time.perf_counter() - start)
                prompt_tokens += result.usage.prompt_tokens
                cached += result.usage.cached_prompt_tokens

        await asyncio.gather(*(one(q) for q in questions))
    return cached / max(1, prompt_tokens), pct(ttfts, 0.5), ttfts


def part_overhead_and_throughput(args) -> None:
    worker = fake_worker()
    worker.wait_serving(30)
    router = start_router([worker.address], LOGS, name="bench-router", extra=["--max-running-runs", "0"])
    router.wait_serving(60)
    try:
        rows = {"direct": [], "router": []}
        for _ in range(args.repeats):
            asyncio.run(router_latencies(router.address, 50))  # warm-up
            rows["direct"].append(asyncio.run(direct_latencies(worker.address, args.tasks)))
            rows["router"].append(asyncio.run(router_latencies(router.address, args.tasks)))
        p50 = {k: statistics.median(pct(r, 0.5) for r in v) * 1000 for k, v in rows.items()}
        p99 = {k: statistics.median(pct(r, 0.99) for r in v) * 1000 for k, v in rows.items()}
        print(f"\n### Added latency per task ({args.tasks} sequential 1-token tasks, medians of {args.repeats})\n")
        print("| path | p50 | p99 |\n|---|---|---|")
        for k in rows:
            print(f"| {k} | {p50[k]:.2f} ms | {p99[k]:.2f} ms |")
        print(f"| **added by the router** | **{p50['router'] - p50['direct']:.2f} ms** | "
              f"**{p99['router'] - p99['direct']:.2f} ms** |")
        tps = [asyncio.run(tasks_per_s(router.address, 2000, 64)) for _ in range(args.repeats)]
        streams = [asyncio.run(token_messages_per_s(router.address, 256, 64, 32)) for _ in range(args.repeats)]
        mps, tps_tokens = [m for m, _ in streams], [t for _, t in streams]
        print("\n### Throughput through one router process\n")
        print("| what | median | runs |\n|---|---|---|")
        print(f"| tasks/s (2,000 Router.Generate calls, 64 in flight) | {statistics.median(tps):,.0f} | "
              f"{', '.join(f'{t:,.0f}' for t in tps)} |")
        print(f"| token messages/s (256 RunStream runs x 64 tokens, 32 in flight) | {statistics.median(mps):,.0f} | "
              f"{', '.join(f'{m:,.0f}' for m in mps)} |")
        print(f"| tokens/s streamed to clients (same runs) | {statistics.median(tps_tokens):,.0f} | "
              f"{', '.join(f'{t:,.0f}' for t in tps_tokens)} |")
    finally:
        router.stop()
        worker.stop()


def part_routing(args) -> None:
    workers = [start_worker("default", LOGS, name=f"bench-worker-{i}",
                            extra=["--threads", "1", "--dtype", "bfloat16", "--max-num-tokens", "2048"])
               for i in range(args.workers)]
    routers = {}
    try:
        for w in workers:
            w.wait_serving(300)
        for policy in ("kv", "round_robin"):
            routers[policy] = start_router([w.address for w in workers], LOGS, name=f"bench-router-{policy}",
                                           extra=["--routing", policy, "--max-running-runs", "0"])
            routers[policy].wait_serving(60)
        results: dict[str, list[tuple[float, float]]] = {p: [] for p in routers}
        seed = 0
        for _ in range(args.repeats):
            for policy, router in routers.items():
                seed += 1
                hit, ttft, _ = asyncio.run(routing_run(router.address, seed, 4))
                results[policy].append((hit, ttft))
        print(f"\n### Routing quality ({args.workers} CPU workers, 8 documents x 6 questions, medians of "
              f"{args.repeats})\n")
        print("| policy | prefix-cache hit rate | TTFT p50 | vs round robin |\n|---|---|---|---|")
        rr = statistics.median(t for _, t in results["round_robin"])
        for policy, rows in results.items():
            ttft = statistics.median(t for _, t in rows)
            print(f"| {policy} | {statistics.median(h for h, _ in rows):.0%} | {ttft * 1000:.0f} ms | "
                  f"{ttft / rr:.2f}x |")
    finally:
        for proc in [*routers.values(), *workers]:
            proc.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="overhead,routing,telemetry",
                   help="overhead (includes throughput), routing, telemetry")
    p.add_argument("--tasks", type=int, default=500)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=4)
    args = p.parse_args()
    parts = {s.strip() for s in args.only.split(",")}
    print(f"$ .venv/bin/python -m benchmarks.router --only {args.only}  (logs in {LOGS})")
    if parts & {"overhead", "throughput"}:
        part_overhead_and_throughput(args)
    if "routing" in parts:
        part_routing(args)
    if "telemetry" in parts:
        part_telemetry(args)


if __name__ == "__main__":
    main()
