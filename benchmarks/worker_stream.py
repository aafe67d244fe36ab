"""One multiplexed Connect stream per worker vs a new Connect stream per task.

    .venv/bin/python -m benchmarks.worker_stream [--tasks 400] [--tokens 16] [--concurrency 32] [--repeats 5]

Both modes talk to the same worker process (the real worker service over a zero-cost fake engine),
so the difference is the transport alone. Reports tasks/s and per-task latency p50/p99, medians
over repeats, the two modes interleaved in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time

import grpc

from client.launcher import Process, free_port
from trellis_rpc.server import CHANNEL_OPTIONS
from trellis_rpc.v1 import common_pb2, worker_pb2, worker_pb2_grpc


def task(task_id: str, tokens: int) -> worker_pb2.WorkerRequest:
    return worker_pb2.WorkerRequest(task_id=task_id, generate=worker_pb2.GenerateTask(
        prompt=common_pb2.Prompt(text="x"), stream=True, sampling=common_pb2.SamplingParams(max_tokens=tokens)))


async def multiplexed(stub, n_tasks: int, tokens: int, concurrency: int) -> list[float]:
    outbox: asyncio.Queue = asyncio.Queue()
    waiters: dict[str, asyncio.Future] = {}

    async def requests():
        while (item := await outbox.get()) is not None:
            yield item

    call = stub.Connect(requests())

    async def read():
        async for r in call:
            if r.WhichOneof("kind") == "generate_result":
                waiters.pop(r.task_id).set_result(None)

    reader = asyncio.create_task(read())
    sem = asyncio.Semaphore(concurrency)
    latencies = []

    async def one(i: int):
        async with sem:
            start = time.perf_counter()
            fut = asyncio.get_running_loop().create_future()
            waiters[f"t{i}"] = fut
            outbox.put_nowait(task(f"t{i}", tokens))
            await fut
            latencies.append(time.perf_counter() - start)

    await asyncio.gather(*(one(i) for i in range(n_tasks)))
    outbox.put_nowait(None)
    call.cancel()
    reader.cancel()
    return latencies


async def per_task(stub, n_tasks: int, tokens: int, concurrency: int) -> list[float]:
    sem = asyncio.Semaphore(concurrency)
    latencies = []

    async def one(i: int):
        async with sem:
            start = time.perf_counter()
            call = stub.Connect(iter([task(f"t{i}", tokens)]))
            async for r in call:
                if r.WhichOneof("kind") == "generate_result":
                    break
            call.cancel()
            latencies.append(time.perf_counter() - start)

    await asyncio.gather(*(one(i) for i in range(n_tasks)))
    return latencies


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def bench(address: str, args) -> dict[str, list[tuple[float, float, float]]]:
    results: dict[str, list[tuple[float, float, float]]] = {"multiplexed": [], "stream per task": []}
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        await multiplexed(stub, 50, args.tokens, args.concurrency)  # warm-up
        for _ in range(args.repeats):
            for name, fn in (("multiplexed", multiplexed), ("stream per task", per_task)):
                start = time.perf_counter()
                lat = await fn(stub, args.tasks, args.tokens, args.concurrency)
                wall = time.perf_counter() - start
                results[name].append((args.tasks / wall, pct(lat, 0.5) * 1000, pct(lat, 0.99) * 1000))
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", type=int, default=400)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    port = free_port()
    popen = subprocess.Popen([sys.executable, "-m", "benchmarks.fake_worker", "--port", str(port)])
    proc = Process("fake-worker", popen, port, log_path=__import__("pathlib").Path("/dev/null"),
                   service="trellis.v1.Worker")
    try:
        proc.wait_serving(30)
        results = asyncio.run(bench(proc.address, args))
    finally:
        proc.stop()
    print(f"{args.tasks} tasks x {args.tokens} streamed tokens, concurrency {args.concurrency}, "
          f"medians of {args.repeats} repeats")
    print("| mode | tasks/s | task latency p50 (ms) | p99 (ms) |\n|---|---|---|---|")
    base = statistics.median(r[0] for r in results["stream per task"])
    for name, rows in results.items():
        tps = statistics.median(r[0] for r in rows)
        print(f"| {name} | {tps:.0f} ({tps / base:.2f}x) | {statistics.median(r[1] for r in rows):.1f} | "
              f"{statistics.median(r[2] for r in rows):.1f} |")


if __name__ == "__main__":
    main()
