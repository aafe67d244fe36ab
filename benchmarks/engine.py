"""The CPU engine against what a user would otherwise run, same model and requests, one run.

    .venv/bin/python -m benchmarks.engine [--dtype float32|bfloat16] [--requests 32] [--prompt-tokens 128]
                                          [--new-tokens 128] [--only trellis,hf_static,hf_cb,hf_single,n16]

Systems, each in a child process of its own (so peak RSS is its own):
- trellis:   worker_cpu's engine, all requests submitted at once (engine loop on the main thread,
             as in the worker process);
- hf_static: Hugging Face `generate`, one static batch of all requests (left padding);
- hf_cb:     transformers' continuous batching (`generate_batch`);
- trellis_single, hf_single: one request at a time (only --single requests, to bound time): the
             decode step at batch 1;
- n16:       trellis with n=16 samples of one 512-token prompt against n=1 of it.
Every request samples (temperature 1) exactly --new-tokens tokens (EOS ignored). Reported: aggregate
output tokens/s, TTFT p50/p99, time per output token p50, peak RSS; and the roofline of a decode
step measured on this machine (weight bytes / memory bandwidth; FLOPs / matmul peak).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time

import torch

SYSTEMS = ("trellis", "hf_static", "hf_cb", "trellis_single", "hf_single", "n16")


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def make_prompts(tokenizer, count: int, length: int) -> list[list[int]]:
    """Distinct prompts of exactly `length` tokens from varied text."""
    words = ("river mountain proof theorem bread engine violet seven quartz harbor lantern "
             "algebra meadow copper signal orbit thunder puzzle garden ledger").split()
    prompts = []
    for i in range(count):
        text = " ".join(words[(i * 7 + j * 3) % len(words)] + str((i * j) % 97) for j in range(length))
        prompts.append(tokenizer(text)["input_ids"][:length])
    return prompts


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- children ---------------------------------------------------------------------------------

def child_trellis(loaded, prompts, new_tokens, n=1) -> dict:
    from trellis_rpc.engine_api import Delta, Finished, PromptInput
    from trellis_rpc.sampling import SamplingConfig
    from worker_cpu.engine import TorchEngine

    # KV sized for the workload (the cache is zero-filled up front, so oversizing it inflates RSS).
    kv_tokens = 2 * sum(len(p) + n * new_tokens for p in prompts) + 1024
    engine = TorchEngine(loaded, max_batch_size=max(64, n), kv_cache_tokens=kv_tokens, start_thread=False,
                         threads=int(os.environ.get("TRELLIS_BENCH_THREADS", "0")) or None)
    results: list[tuple[float, float, int]] = []

    async def one(i: int, ids: list[int]) -> None:
        start = time.perf_counter()
        first, tokens = None, 0
        cfg = SamplingConfig(n=n, max_tokens=new_tokens, ignore_eos=True, seed=i)
        async for event in engine.generate(f"r{i}", PromptInput(token_ids=ids), cfg):
            if isinstance(event, Delta):
                tokens += len(event.token_ids)
                first = first or time.perf_counter()
            elif isinstance(event, Finished):
                results.append((first - start, time.perf_counter() - start, tokens))

    async def client() -> float:
        start = time.perf_counter()
        await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        return time.perf_counter() - start

    wall: list[float] = []
    thread = threading.Thread(target=lambda: (wall.append(asyncio.run(client())), engine.close()))
    thread.start()
    engine.run()  # the main thread, as in the worker process
    thread.join()
    per_seq_tokens = [r[2] / n for r in results]
    return {
        "wall_s": wall[0], "tokens": sum(r[2] for r in results),
        "ttft": [r[0] for r in results],
        "tpot": [(r[1] - r[0]) / max(1, t - 1) for r, t in zip(results, per_seq_tokens, strict=True)],
        "prefill_tokens": engine.stats.prefill_tokens,
    }


def child_hf_static(model, prompts, new_tokens) -> dict:
    from transformers import LogitsProcessor, LogitsProcessorList

    class StepClock(LogitsProcessor):
        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            return scores

    width = max(len(p) for p in prompts)
    pad = 0
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    clock = StepClock()
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=True, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=pad,
                         logits_processor=LogitsProcessorList([clock]))
    wall = time.perf_counter() - start
    steps = [b - a for a, b in zip(clock.times, clock.times[1:], strict=False)]
    ttft = clock.times[0] - start
    return {"wall_s": wall, "tokens": (out.shape[1] - width) * len(prompts), "ttft": [ttft] * len(prompts),
            "tpot": [statistics.median(steps)] * len(prompts)}


def child_hf_cb(model, prompts, new_tokens) -> dict:
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True,
                              temperature=1.0, top_k=0, top_p=1.0, eos_token_id=None, pad_token_id=0)
    start = time.perf_counter()
    outputs = model.generate_batch(inputs=prompts, generation_config=config, record_timestamps=True)
    wall = time.perf_counter() - start
    ttft, tpot, tokens = [], [], 0
    for out in outputs.values():
        if out.error:
            raise RuntimeError(out.error)
        tokens += len(out.generated_tokens)
        stamps = out.timestamps or []
        if stamps:
            ttft.append(stamps[0] - start)
            tpot.append((stamps[-1] - stamps[0]) / max(1, len(stamps) - 1))
    return {"wall_s": wall, "tokens": tokens, "ttft": ttft, "tpot": tpot}


def child_hf_single(model, prompts, new_tokens) -> dict:
    from transformers import LogitsProcessor, LogitsProcessorList

    class StepClock(LogitsProcessor):
        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            return scores

    ttft, tpot, tokens = [], [], 0
    start_all = time.perf_counter()
    for p in prompts:
        clock = StepClock()
        start = time.perf_counter()
        out = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True, temperature=1.0,
                             top_k=0, top_p=1.0, pad_token_id=0, logits_processor=LogitsProcessorList([clock]))
        tokens += out.shape[1] - len(p)
        ttft.append(clock.times[0] - start)
        tpot.append(statistics.median(b - a for a, b in zip(clock.times, clock.times[1:], strict=False)))
    return {"wall_s": time.perf_counter() - start_all, "tokens": tokens, "ttft": ttft, "tpot": tpot}


def warm_up(loaded, prompt: list[int]) -> None:
    """First forward passes pay one-time costs (allocator, MKL setup) that no system should be timed on."""
    with torch.inference_mode():
        loaded.model.generate(torch.tensor([prompt]), max_new_tokens=2, do_sample=False, pad_token_id=0)


def run_child(args) -> None:
    from worker_cpu.model_loader import load_model

    torch.manual_seed(0)
    loaded = load_model("default", args.dtype)
    prompts = make_prompts(loaded.tokenizer, args.requests, args.prompt_tokens)
    warm_up(loaded, prompts[0])
    if args.child == "hf_cb":  # it manages its own grad mode and fails under inference_mode
        result = child_hf_cb(loaded.model, prompts, args.new_tokens)
        result["peak_rss_mib"] = peak_rss_mib()
        print(json.dumps(result))
        return
    with torch.inference_mode():
        if args.child == "trellis":
            result = child_trellis(loaded, prompts, args.new_tokens)
        elif args.child == "hf_static":
            result = child_hf_static(loaded.model, prompts, args.new_tokens)
        elif args.child == "trellis_single":
            runs = [child_trellis(loaded, [p], args.new_tokens) for p in prompts[:args.single]]
            result = {"wall_s": sum(r["wall_s"] for r in runs), "tokens": sum(r["tokens"] for r in runs),
                      "ttft": [t for r in runs for t in r["ttft"]], "tpot": [t for r in runs for t in r["tpot"]]}
        elif args.child == "hf_single":
            result = child_hf_single(loaded.model, prompts[:args.single], args.new_tokens)
        else:  # n16: one 512-token prompt, n=16 against n=1
            prompt = make_prompts(loaded.tokenizer, 1, 512)
            one = child_trellis(loaded, prompt, args.new_tokens, n=1)
            sixteen = child_trellis(loaded, prompt, args.new_tokens, n=16)
            result = {"n1_s": one["wall_s"], "n16_s": sixteen["wall_s"], "prompt_tokens": len(prompt[0]),
                      "prefill_tokens_n16": sixteen["prefill_tokens"]}
    result["peak_rss_mib"] = peak_rss_mib()
    print(json.dumps(result))


# ---- parent -----------------------------------------------------------------------------------

def roofline(dtype: torch.dtype, params: int, weight_bytes: int) -> dict:
    a = torch.randn(64 * 1024 * 1024)
    a.sum()
    start = time.perf_counter()
    for _ in range(5):
        a.sum()
    bandwidth = 5 * a.numel() * 4 / (time.perf_counter() - start)
    m = torch.randn(2048, 2048, dtype=dtype)
    m @ m
    start = time.perf_counter()
    for _ in range(5):
        m @ m
    flops = 5 * 2 * 2048 ** 3 / (time.perf_counter() - start)
    step = {b: max(weight_bytes / bandwidth, 2 * params * b / flops) * 1000 for b in (1, 32)}
    return {"bandwidth_gbs": bandwidth / 1e9, "matmul_gflops": flops / 1e9, "step_ms": step}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--single", type=int, default=4, help="requests for hf_single (one at a time is slow)")
    p.add_argument("--only", default=",".join(SYSTEMS))
    p.add_argument("--child", choices=SYSTEMS, help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.child:
        run_child(args)
        return
    command = "python -m benchmarks.engine " + " ".join(sys.argv[1:])
    print(f"$ {command}\n")
    results = {}
    for system in args.only.split(","):
        cmd = [sys.executable, "-m", "benchmarks.engine", "--child", system, "--dtype", args.dtype,
               "--requests", str(args.requests), "--prompt-tokens", str(args.prompt_tokens),
               "--new-tokens", str(args.new_tokens), "--single", str(args.single)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            results[system] = {"error": " | ".join(tail)}
        else:
            results[system] = json.loads(lines[-1])
        print(f"{system}: {json.dumps(results[system])[:300]}", file=sys.stderr)
    from worker_cpu.model_loader import load_model

    model = load_model("default", args.dtype).model
    params = sum(t.numel() for t in model.parameters())
    weight_bytes = sum(t.numel() * t.element_size() for t in model.parameters())
    roof = roofline(model.dtype, params, weight_bytes)
    report(args, results, roof)


def report(args, results: dict, roof: dict) -> None:
    base = results.get("hf_static", {})
    base_tps = base["tokens"] / base["wall_s"] if "tokens" in base else None
    print(f"SmolLM2-135M-Instruct {args.dtype}, {args.requests} requests x {args.prompt_tokens} prompt tokens, "
          f"{args.new_tokens} sampled new tokens each\n")
    print("| system | output tokens/s | vs HF generate batch | TTFT p50 | TTFT p99 | time/output token p50 "
          "| peak RSS |\n|---|---|---|---|---|---|---|")
    names = {"trellis": "Trellis engine", "hf_static": f"HF generate, static batch of {args.requests}",
             "hf_cb": "transformers continuous batching",
             "trellis_single": f"Trellis engine, one request at a time ({args.single})",
             "hf_single": f"HF generate, one request at a time ({args.single})"}
    for system, name in names.items():
        r = results.get(system)
        if r is None:
            continue
        if "error" in r:
            print(f"| {name} | failed: {r['error'][:160]} | | | | | |")
            continue
        tps = r["tokens"] / r["wall_s"]
        ratio = f"{tps / base_tps:.2f}x" if base_tps else "n/a"
        ttft = f"{pct(r['ttft'], .5) * 1000:.0f} ms | {pct(r['ttft'], .99) * 1000:.0f} ms"
        print(f"| {name} | {tps:.1f} | {ratio} | {ttft} | {pct(r['tpot'], .5) * 1000:.1f} ms "
              f"| {r['peak_rss_mib']:.0f} MiB |")
    print(f"\nRoofline here: memory bandwidth {roof['bandwidth_gbs']:.1f} GB/s, "
          f"matmul {roof['matmul_gflops']:.0f} GFLOP/s -> decode step >= {roof['step_ms'][1]:.1f} ms at batch 1, "
          f">= {roof['step_ms'][32]:.1f} ms at batch 32.")
    step = {s: pct(results[s]["tpot"], .5) * 1000 for s in SYSTEMS if "tpot" in results.get(s, {})}
    if {"trellis_single", "hf_single"} <= set(step):
        print(f"Decode step at batch 1: Trellis {step['trellis_single']:.1f} ms, "
              f"HF generate {step['hf_single']:.1f} ms "
              f"({step['trellis_single'] / step['hf_single']:.2f}x).")
    if {"trellis", "hf_static"} <= set(step):
        print(f"Decode step at batch {args.requests}: Trellis {step['trellis']:.1f} ms, HF generate "
              f"{step['hf_static']:.1f} ms ({step['trellis'] / step['hf_static']:.2f}x).")
    n16 = results.get("n16")
    if n16 and "n16_s" in n16:
        print(f"n=16 samples of a {n16['prompt_tokens']}-token prompt: {n16['n16_s']:.1f} s vs n=1 {n16['n1_s']:.1f} s "
              f"({n16['n16_s'] / n16['n1_s']:.2f}x); prompt tokens prefilled: {n16['prefill_tokens_n16']}.")


if __name__ == "__main__":
    main()
