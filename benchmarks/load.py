"""Load and soak: many concurrent runs for a bounded time through real processes on loopback.

    .venv/bin/python -m benchmarks.load                                   # 64 concurrent runs, 10 minutes
    .venv/bin/python -m benchmarks.load --duration 60 --concurrency 16    # a quick look

A router (metrics on) over --workers CPU workers (the tiny random Llama of the tests by default, so the
service itself rather than the model dominates; `--model default` for SmolLM2-135M). Clients keep
--concurrency runs in flight until --duration seconds or --max-runs runs have started, drawing from
a mix of controllers (native generation, majority vote, best-of-N with the verifier, beam search with
the verifier, Dynasor-CoT keeping its reasoning on the worker between chunks), each with a deadline. A
run is *lost* when it neither returns a result nor fails with a gRPC status by its deadline plus a
grace period: the target is zero. Memory is each process's RSS
(/proc), sampled every 10 s: growth is the last sample against the first one after warm-up (the
first --warmup seconds); the target is under 5%. Reported: runs by outcome, success rate, latency
p50/p99 of successful runs, RSS per process at warm-up end and at the end, and each worker's KV blocks,
kept sequences and running sequences once the load stops (from its metrics endpoint): all back to zero
within seconds, or something leaked.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

from client.launcher import free_port, start_router, start_worker
from trellis_client import AsyncClient, Sampling, TrellisError

LOGS = Path(tempfile.mkdtemp(prefix="trellis-bench-load-"))
QUESTIONS = ("What is 7 + 5?", "Name a prime number above 20.", "What is 9 times 6?", "Spell 'tree' backwards.",
             "What is 100 minus 37?", "Which is larger, 0.3 or 0.25?")
MIX = (  # (controller, params, max_tokens)
    ("native_generation", {}, 24),
    ("majority_vote", {"n": 4}, 16),
    ("best_of_n", {"n": 3, "score_kind": "verifier"}, 16),
    ("beam_search", {"beam_width": 2, "expansions": 2, "max_steps": 2, "max_step_tokens": 8, "kind": "verifier"}, 12),
    ("dynasor_cot", {"max_tokens": 32, "probe_interval": 8, "agree": 2, "probe_tokens": 4}, 16),
)
WORKER_GAUGES = ("kv_blocks_used", "kept_sequences", "running_sequences")


def worker_state(metrics_port: int) -> dict[str, float]:
    """The worker's WORKER_GAUGES, from its Prometheus endpoint."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    values = {name: 0.0 for name in WORKER_GAUGES}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name.removeprefix("trellis_worker_")
            if name in values:
                values[name] += sample.value
    return values


def wait_idle(metrics_ports: dict[str, int], timeout_s: float = 30.0) -> dict[str, tuple[dict[str, float], float]]:
    """{worker: (its gauges, seconds until they were all zero, or the timeout)} once the load has stopped."""
    t0 = time.monotonic()
    out = {}
    for name, port in metrics_ports.items():
        while True:
            state = worker_state(port)
            if not any(state.values()) or time.monotonic() - t0 > timeout_s:
                out[name] = (state, time.monotonic() - t0)
                break
            time.sleep(0.2)
    return out


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def one_run(client: AsyncClient, rng: random.Random, deadline_s: float) -> tuple[str, float]:
    controller, params, max_tokens = MIX[rng.randrange(len(MIX))]
    question = rng.choice(QUESTIONS)
    sampling = Sampling(max_tokens=max_tokens, seed=rng.randrange(1 << 30))
    started = time.perf_counter()
    try:
        # The client's own bound: a run that outlives its deadline by the grace period is lost.
        await asyncio.wait_for(client.run(controller, question, params=params, sampling=sampling,
                                          deadline=deadline_s), deadline_s + 10)
        return "OK", time.perf_counter() - started
    except TrellisError as err:
        return err.code.name, time.perf_counter() - started
    except TimeoutError:
        return "LOST", time.perf_counter() - started


async def drive(address: str, args: argparse.Namespace, pids: dict[str, int]) -> dict:
    rng = random.Random(args.seed)
    outcomes: Counter[str] = Counter()
    latencies: list[float] = []
    memory: dict[str, list[tuple[float, float]]] = {name: [] for name in pids}
    t0 = time.monotonic()
    started = 0

    async def sample_memory() -> None:
        while True:
            now = time.monotonic() - t0
            for name, pid in pids.items():
                memory[name].append((now, rss_mib(pid)))
            await asyncio.sleep(10)

    async with AsyncClient(address) as trellis:

        async def client() -> None:
            nonlocal started
            while time.monotonic() - t0 < args.duration and started < args.max_runs:
                started += 1
                outcome, latency = await one_run(trellis, rng, args.deadline)
                outcomes[outcome] += 1
                if outcome == "OK":
                    latencies.append(latency)

        sampler = asyncio.create_task(sample_memory())
        await asyncio.gather(*(client() for _ in range(args.concurrency)))
        sampler.cancel()
        for name, pid in pids.items():
            memory[name].append((time.monotonic() - t0, rss_mib(pid)))
    return {"outcomes": outcomes, "latencies": latencies, "memory": memory, "wall": time.monotonic() - t0}


def report(args: argparse.Namespace, result: dict) -> None:
    outcomes, latencies = result["outcomes"], sorted(result["latencies"])
    total = sum(outcomes.values())
    print(f"\n### Load and soak ({args.concurrency} concurrent runs, {result['wall']:.0f} s, {args.workers} workers, "
          f"model {args.model})\n")
    print("| runs | ok | success | lost | other outcomes | latency p50 | p99 |\n|---|---|---|---|---|---|---|")
    others = ", ".join(f"{k} {v}" for k, v in outcomes.items() if k not in ("OK", "LOST")) or "none"
    p50 = statistics.median(latencies) if latencies else 0.0
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else 0.0
    print(f"| {total} | {outcomes['OK']} | {outcomes['OK'] / max(1, total):.2%} | {outcomes['LOST']} | {others} | "
          f"{p50 * 1000:.0f} ms | {p99 * 1000:.0f} ms |")
    print(f"\nMemory (RSS; growth = end against the first sample after {args.warmup:.0f} s of warm-up):\n")
    print("| process | at warm-up end | at end | growth |\n|---|---|---|---|")
    for name, samples in result["memory"].items():
        after = [m for t, m in samples if t >= args.warmup] or [samples[-1][1]]
        print(f"| {name} | {after[0]:.0f} MiB | {samples[-1][1]:.0f} MiB | {(samples[-1][1] / after[0] - 1):+.1%} |")
    print("\nWorkers once the load stopped (KV blocks in use, kept sequences, running sequences):\n")
    print("| worker | " + " | ".join(WORKER_GAUGES) + " | all zero after |\n|---|---|---|---|---|")
    for name, (state, waited) in result["idle"].items():
        print(f"| {name} | " + " | ".join(f"{state[g]:.0f}" for g in WORKER_GAUGES) + f" | {waited:.1f} s |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    p.add_argument("--max-runs", type=int, default=1_000_000, help="stop starting runs after this many")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--model", default="tiny", help="'tiny' (the tests' random Llama), 'default' or a model dir")
    p.add_argument("--deadline", type=float, default=60.0, help="each run's deadline in seconds")
    p.add_argument("--warmup", type=float, default=60.0, help="seconds before the memory baseline")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    args.warmup = min(args.warmup, args.duration / 2)
    model = args.model
    if model == "tiny":
        from tests.tiny_model import build_tiny_llama

        model = str(build_tiny_llama(LOGS / "tiny-llama"))
    metrics_ports = {f"load-worker-{i}": free_port() for i in range(args.workers)}
    workers = [start_worker(model, LOGS, name=name, extra=["--threads", "1", "--metrics-port", str(port),
                                                           "--metrics-host", "127.0.0.1"])
               for name, port in metrics_ports.items()]
    router = None
    try:
        for w in workers:
            w.wait_serving(timeout=300)
        router = start_router([w.address for w in workers], LOGS, name="load-router",
                              extra=["--max-running-runs", str(args.concurrency)])
        router.wait_serving(timeout=60)
        pids = {"router": router.popen.pid} | {w.name: w.popen.pid for w in workers}
        print(f"$ .venv/bin/python -m benchmarks.load --duration {args.duration:.0f} --concurrency "
              f"{args.concurrency} --workers {args.workers} --model {args.model}  (logs in {LOGS})")
        result = asyncio.run(drive(router.address, args, pids))
        result["idle"] = wait_idle(metrics_ports)
        report(args, result)
    finally:
        for proc in (router, *workers):
            if proc is not None:
                proc.stop()


if __name__ == "__main__":
    main()
