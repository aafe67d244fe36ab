"""Program-aware scheduling against first come, first served, on a saturated CPU worker (issue 20).

    .venv/bin/python -m benchmarks.scheduling [--seconds 30] [--rate 1] [--long 3] [--max-batch-size 16] [--repeats 3]
    .venv/bin/python -m benchmarks.scheduling --rates 0.5,1,1.5 --p99-target 10     # runs/s at a fixed p99

One real router and one real CPU worker (the bundled SmolLM2-135M-Instruct unless --model), started once per
policy (`--scheduling fcfs`, then `run_las`) with the same seeded workload: short runs arriving at a steady
Poisson rate (native generation and majority vote n=4, alternating) and `--long` long programs running back to
back the whole time (beam search, 4 beams x 4 expansions, with the model verifying its own steps, then MCTS),
all over the arithmetic eval set. Reported per policy: mean and p99 run latency per kind, runs finished, and
accuracy; every run is seeded, and the engine's seeded samples do not depend on their batch company, so a policy
can change when a run finishes but not what it answers (the benchmark counts the answers that differ).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.openai_worker import cpu_line
from benchmarks.router import pct
from client.eval import answer_number
from client.launcher import start_router, start_worker
from trellis_client import AsyncClient, TrellisError

DATA = Path(__file__).resolve().parent / "data" / "arith.jsonl"
SEARCH = {"kind": "verifier", "max_step_tokens": 32, "max_steps": 4}
SHORT = [("native_generation", {}), ("majority_vote", {"n": 4})]
LONG = [("beam_search", {"beam_width": 4, "expansions": 4, **SEARCH}), ("mcts", {"iterations": 6, **SEARCH})]


async def workload(address: str, seconds: float, rate: float, long_programs: int, seed: int) -> list[dict]:
    questions = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    rng = random.Random(seed)
    done: list[dict] = []
    stop = time.monotonic() + seconds

    async def one(client: AsyncClient, kind: str, controller: str, params: dict, number: int) -> None:
        q = questions[number % len(questions)]
        started = time.monotonic()
        try:
            result = await client.run(controller, q["question"] + " Answer with the final number.", params=params,
                                      sampling={"max_tokens": 48, "temperature": 0.7, "seed": number},
                                      deadline=600)
            answer, error = answer_number(result.text), ""
        except TrellisError as err:
            answer, error = "", err.code.name
        done.append({"kind": kind, "controller": controller, "number": number, "latency": time.monotonic() - started,
                     "answer": answer, "correct": answer == q["answer"], "error": error, "ended": time.monotonic()})

    async with AsyncClient(address) as client:
        async def long_loop(slot: int) -> None:
            number = 10_000 * (slot + 1)
            while time.monotonic() < stop:
                controller, params = LONG[number % len(LONG)]
                await one(client, "long", controller, params, number)
                number += 1

        tasks = [asyncio.create_task(long_loop(i)) for i in range(long_programs)]
        short, number = [], 0
        while time.monotonic() < stop:       # open loop: arrivals do not wait for earlier runs
            controller, params = SHORT[number % len(SHORT)]
            short.append(asyncio.create_task(one(client, "short", controller, params, number)))
            number += 1
            await asyncio.sleep(rng.expovariate(rate))
        await asyncio.gather(*short, *tasks)
    return done


def summary(runs: list[dict]) -> dict:
    """Per kind (short, long) and per controller: runs, errors, mean / p50 / p99 latency, accuracy."""
    out = {}
    for kind in ("short", "long", *sorted({r["controller"] for r in runs})):
        mine = [r for r in runs if kind in (r["kind"], r["controller"]) and not r["error"]]
        lat = [r["latency"] for r in mine] or [float("nan")]
        out[kind] = {"runs": len(mine), "errors": sum(1 for r in runs if kind in (r["kind"], r["controller"])
                                                      and r["error"]),
                     "mean": statistics.mean(lat), "p50": pct(lat, 0.5), "p99": pct(lat, 0.99),
                     "accuracy": sum(r["correct"] for r in mine) / max(1, len(mine))}
    return out


def run_policy(policy: str, args: argparse.Namespace, logs: Path, repeat: int) -> list[dict]:
    worker = start_worker(args.model, logs, name=f"worker-{policy}-{repeat}",
                          extra=["--scheduling", policy, "--max-batch-size", str(args.max_batch_size)])
    router = None
    try:
        worker.wait_serving(600)
        router = start_router([worker.address], logs, name=f"router-{policy}-{repeat}")
        router.wait_serving(60)
        return asyncio.run(workload(router.address, args.seconds, args.rate, args.long, args.seed))
    finally:
        for proc in (router, worker):
            if proc is not None:
                proc.stop()


def sweep(args: argparse.Namespace, logs: Path, policies: list[str]) -> None:
    """Runs/s at a fixed p99: each policy at each short-run rate; the highest rate whose short runs' p99 stays
    within --p99-target, and the runs finished per second there (short and long together)."""
    rates = [float(r) for r in args.rates.split(",")]
    table: dict[tuple[str, float], tuple[dict, int]] = {}
    for rate in rates:
        for policy in policies:
            runs = run_policy(policy, argparse.Namespace(**{**vars(args), "rate": rate}), logs, int(rate * 100))
            table[policy, rate] = summary(runs), sum(1 for r in runs if not r["error"])
            s = table[policy, rate][0]
            print(f"rate {rate}/s {policy}: short p99 {s['short']['p99']:.2f} s, long mean {s['long']['mean']:.2f} s",
                  flush=True)
    window = args.seconds
    print("\n| short runs/s offered | " + " | ".join(f"{p}: short p99, runs/s" for p in policies) + " |")
    print("|---|" + "---|" * len(policies))
    for rate in rates:
        cells = [f"{table[p, rate][0]['short']['p99']:.2f} s, {table[p, rate][1] / window:.2f}" for p in policies]
        print(f"| {rate} | " + " | ".join(cells) + " |")
    for policy in policies:
        ok = [rate for rate in rates if table[policy, rate][0]["short"]["p99"] <= args.p99_target]
        best = max(ok) if ok else None
        print(f"{policy}: highest rate with short p99 <= {args.p99_target} s: "
              + (f"{best}/s ({table[policy, best][1] / window:.2f} runs/s finished)" if best else "none"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--seconds", type=float, default=30.0, help="arrivals for this long, per policy")
    p.add_argument("--rate", type=float, default=1.0, help="short runs per second")
    p.add_argument("--long", type=int, default=3, help="long programs running back to back")
    p.add_argument("--policies", default="fcfs,run_las")
    p.add_argument("--repeats", type=int, default=1,
                   help="run the policies in turn this many times (fcfs, run_las, fcfs, ...); ratios are per repeat")
    p.add_argument("--max-batch-size", type=int, default=16,
                   help="the worker's rows per step: beyond, tasks wait, and the policy decides which goes next")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--rates", default="", help="sweep these short-run rates (e.g. 0.5,1,1.5) instead of repeating "
                   "one: runs/s at a fixed p99")
    p.add_argument("--p99-target", type=float, default=10.0, help="the sweep's short-run p99 latency target (s)")
    args = p.parse_args()
    print(cpu_line(), flush=True)
    logs = Path(tempfile.mkdtemp(prefix="trellis-bench-sched-"))
    policies = args.policies.split(",")
    if args.rates:
        sweep(args, logs, policies)
        return
    rounds: list[dict[str, dict]] = []
    answers: list[dict[str, dict[int, str]]] = []
    for repeat in range(args.repeats):
        sums, got = {}, {}
        for policy in policies:
            runs = run_policy(policy, args, logs, repeat)
            sums[policy] = summary(runs)
            got[policy] = {r["number"]: r["answer"] for r in runs}
            print(f"repeat {repeat + 1} {policy}: {json.dumps(sums[policy])}", flush=True)
        rounds.append(sums)
        answers.append(got)
    print(f"\nworkload: short runs (native_generation, majority_vote n=4) at {args.rate}/s for {args.seconds:.0f} s, "
          f"{args.long} long programs (beam_search, mcts) back to back; model {args.model}, worker max batch "
          f"{args.max_batch_size}; logs {logs}\n")
    print("| repeat | policy | short runs | short mean | short p99 | long runs | long mean | long p99 "
          "| accuracy short/long |")
    print("|---|---|---|---|---|---|---|---|---|")
    for repeat, sums in enumerate(rounds, 1):
        for policy, s in sums.items():
            sh, lo = s["short"], s["long"]
            print(f"| {repeat} | {policy} | {sh['runs']} | {sh['mean']:.2f} s | {sh['p99']:.2f} s | {lo['runs']} "
                  f"| {lo['mean']:.2f} s | {lo['p99']:.2f} s | {sh['accuracy']:.0%} / {lo['accuracy']:.0%} |")
    controllers = sorted(k for k in rounds[0][policies[0]] if k not in ("short", "long"))
    print("\nPer controller, medians over the repeats (mean / p99 latency):\n")
    print("| controller | " + " | ".join(policies) + " |")
    print("|---|" + "---|" * len(policies))
    for name in controllers:
        cells = []
        for policy in policies:
            means = [r[policy][name]["mean"] for r in rounds if name in r[policy]]
            p99s = [r[policy][name]["p99"] for r in rounds if name in r[policy]]
            cells.append(f"{statistics.median(means):.2f} s / {statistics.median(p99s):.2f} s")
        print(f"| {name} | " + " | ".join(cells) + " |")
    if {"fcfs", "run_las"} <= set(policies):
        short = [r["run_las"]["short"]["p99"] / r["fcfs"]["short"]["p99"] for r in rounds]
        long = [r["run_las"]["long"]["mean"] / r["fcfs"]["long"]["mean"] for r in rounds]
        shown = lambda xs: ", ".join(f"{x:.2f}" for x in xs)  # noqa: E731
        print(f"\nshort p99, run_las / fcfs: {shown(short)}; median {statistics.median(short):.2f} (target <= 0.5)")
        print(f"long mean, run_las / fcfs: {shown(long)}; median {statistics.median(long):.2f} (target <= 1.1)")
        for repeat, got in enumerate(answers, 1):
            both = set(got["fcfs"]) & set(got["run_las"])
            differ = sum(1 for n in both if got["fcfs"][n] != got["run_las"][n])
            print(f"repeat {repeat}: answers of runs both policies finished: {len(both)}, differing: {differ}")


if __name__ == "__main__":
    main()
