"""The CPU engine against what a user would otherwise run: same model, same requests, one run.

    make llamacpp                                               # once: builds llama.cpp (minutes) for its systems
    .venv/bin/python -m benchmarks.engine                       # every system, each --quantize mode; ~15 min, 2 cores
    .venv/bin/python -m benchmarks.engine --quantize int8 --only trellis,trellis_single,llamacpp,llamacpp_single
    .venv/bin/python -m benchmarks.engine --dtype bfloat16 --repeats 3 --only trellis,hf_static
    .venv/bin/python -m benchmarks.engine --engine-arg max_num_tokens=1024 --engine-arg block_size=32

Model: the bundled SmolLM2-135M-Instruct (`load_model("default")`). Workload: --requests distinct
prompts of about --prompt-tokens tokens (lengths vary +-12.5% around it, built deterministically
from varied text with the model's tokenizer), each sampling (temperature --temperature, no top-k /
top-p) exactly --new-tokens tokens: EOS is ignored (`ignore_eos` for Trellis, `min_new_tokens` for
`generate`, EOS id -1 for continuous batching).

Systems (--only), each measured in a child process of its own (`--child SYSTEM`, one JSON line back),
so peak RSS is the system's own; with --repeats the systems are interleaved and medians reported. The Trellis
systems (trellis, trellis_single, n16, worker_start) run once per --quantize mode (default: none and int8; the
engine compiles the decode step of quantized modes, compile=auto):
- trellis:        torch_engine's TorchEngine, all requests submitted at once from asyncio (the engine loop on
                  the main thread, as in the worker process, when the engine can run there);
- hf_static:      HF `generate`, one static batch of all requests (left padding, attention mask);
- hf_cb:          transformers' continuous batching (`init_continuous_batching` manager: add_requests,
                  get_result), its KV cache sized like ours (by default it takes 60% of RAM on CPU);
- trellis_single: TorchEngine, one request at a time (the first --single requests): decode at batch 1;
- hf_single:      HF `generate`, one request at a time (the first --single requests; timing all of
                  them would take ~10 minutes on 2 cores);
- llamacpp:       llama.cpp through llama-cpp-python's C API on the bundled Q4_1 .gguf itself, all requests at once
                  as parallel sequences of one context (benchmarks/llamacpp_batch.py; needs `make llamacpp`);
- llamacpp_single: the same, one request at a time;
- n16:            TorchEngine, n=16 samples of one --n16-prompt-tokens prompt against n=1 of it;
- worker_start:   `python -m worker_cpu` on the bundled model until it serves, with empty caches (the .gguf
                  converted, the decode step compiled) and again with what that start cached;
- roofline:       this machine's memory bandwidth (sum of a 256 MiB tensor) and fp32 / bf16 matmul
                  peak (2048^3), giving a lower bound on a decode step:
                  max(weight bytes / bandwidth, 2 * params * batch / matmul peak).

Reported: aggregate output tokens/s (all output tokens / wall time from first submission to last
token), TTFT p50 / p99 (from submission; static `generate` gives every row the time of its first
step, taken by a streamer), time per output token p50 (per request: (latency - TTFT) / (tokens - 1)),
peak RSS, and the decode step (median gap between a request's consecutive tokens) at batch 1 and at
batch --requests next to the roofline. Every system is warmed up first (same shapes, other prompts,
2 tokens), and engine / manager construction is not timed. The CPU's model and its relevant flags are printed
first, and the issue 17 targets are checked from the run's ratios last.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import inspect
import json
import math
import os
import random
import resource
import shlex
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

SYSTEMS = ("trellis", "hf_static", "hf_cb", "llamacpp", "trellis_single", "hf_single", "llamacpp_single", "n16",
           "worker_start", "roofline")
TRELLIS_SYSTEMS = ("trellis", "trellis_single", "n16", "worker_start")  # run once per --quantize mode
REPO = Path(__file__).resolve().parent.parent

# Varied text for the prompts; every prompt starts with its own numbered header, so no two share a KV block.
PASSAGES = (
    "The river rose for three days after the storm, and the ferry that usually crossed at dawn stayed tied "
    "to its post while farmers on both banks moved their animals to higher ground.",
    "To prove that the square root of two is irrational, assume it equals a fraction in lowest terms and "
    "show that both the numerator and the denominator must then be even.",
    "A sourdough starter is a culture of wild yeast and lactic acid bacteria; feed it flour and water at "
    "the same hour every day and it will double within a few hours of each feeding.",
    "The compiler first turns the source into tokens, then builds a syntax tree, checks the types, lowers "
    "the tree into an intermediate form and finally allocates registers for the target machine.",
    "In the spring of 1854 a physician in London mapped the cholera cases around Broad Street and "
    "persuaded the parish to remove the handle of the water pump.",
    "Quartz is a hard crystalline mineral made of silicon and oxygen; under pressure it produces a small "
    "voltage, which is why it keeps time in watches and radios.",
    "The harbor master counted forty ships at anchor, most of them waiting for the tide, and sent a boy "
    "along the quay with a lantern to warn the captains about the fog.",
    "Linear algebra studies vector spaces and the maps between them; a matrix is only one way of writing "
    "such a map down once a basis has been chosen for each space.",
    "The meadow behind the school is mowed twice a year, in June and in September, so that the wild "
    "flowers can set seed and the insects that live among them survive the winter.",
    "Copper conducts heat and electricity well, resists corrosion and is easy to shape, which is why it "
    "has been used for pipes, wires, coins and cooking pots for thousands of years.",
    "A good signal processing course starts with sampling: a continuous signal can be rebuilt from its "
    "samples only if it contains no frequency above half the sampling rate.",
    "The satellite's orbit decays slowly because of the thin atmosphere at that altitude, so twice a "
    "year the operators fire its thrusters for a few seconds to raise it again.",
    "Thunder is the sound of air expanding violently when lightning heats it to tens of thousands of "
    "degrees in a fraction of a second; count the seconds after the flash to estimate the distance.",
    "The puzzle asks for a path through the maze that visits every room exactly once, which turns out to "
    "be a much harder problem than finding any path from the entrance to the exit.",
    "My grandmother kept a ledger of every jar of jam she made, with the date, the fruit, the weight of "
    "sugar and, in the margin, a note on who had received each jar as a gift.",
    "The violin is carved from spruce and maple; its sound depends on the thickness of the plates, the "
    "varnish, the position of the sound post and, some say, the age of the wood.",
    "When the central bank raises interest rates, borrowing becomes more expensive, spending slows and, "
    "after a delay of a year or more, the rise in prices usually slows as well.",
    "Seven hikers left the hut before sunrise, roped together on the glacier, and reached the summit just "
    "as the clouds began to build over the valley to the west.",
    "A hash table stores keys in an array of buckets chosen by a hash function; when two keys land in the "
    "same bucket, the table either chains them in a list or probes for another slot.",
    "The garden was planned around an old pear tree: beds of herbs in the sun to the south of it, ferns "
    "and hostas in its shade, and a gravel path that circled the trunk.",
)
TOPICS = ("rivers", "proofs", "bread", "compilers", "history", "minerals", "harbors", "algebra", "meadows",
          "metals", "signals", "orbits", "weather", "puzzles", "family", "music", "economics", "mountains",
          "data structures", "gardens")


def make_prompts(tokenizer, count: int, length: int, offset: int = 0, jitter: bool = True) -> list[list[int]]:
    """`count` distinct prompts averaging `length` tokens (each +-12.5% when jitter), deterministic.
    `offset` gives another set of the same lengths (warm-up prompts that share nothing with the timed ones)."""
    spread = length // 8 if jitter and count > 1 else 0
    lengths = [length + round(spread * (2 * k / max(1, count - 1) - 1)) for k in range(count)]
    random.Random(1234).shuffle(lengths)
    prompts = []
    for i, target in enumerate(lengths):
        j = i + offset
        text = f"Note {j + 1}, on {TOPICS[j % len(TOPICS)]}.\n"
        k = 0
        while len(tokenizer(text, add_special_tokens=False)["input_ids"]) < target:
            text += PASSAGES[(j * 7 + k * 3) % len(PASSAGES)] + " "
            k += 1
        prompts.append(tokenizer(text, add_special_tokens=False)["input_ids"][:target])
    return prompts


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    values = sorted(values)
    return values[max(0, math.ceil(q * len(values)) - 1)]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def parse_engine_args(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--engine-arg {item!r}: expected key=value")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def summarize(ttft: list[float], latency: list[float], tokens: list[int], gaps: list[float], wall: float) -> dict:
    return {
        "wall_s": wall, "tokens": sum(tokens), "requests": len(tokens),
        "ttft": ttft, "tpot": [(lat - t) / max(1, n - 1) for t, lat, n in zip(ttft, latency, tokens, strict=True)],
        "step_s": statistics.median(gaps) if gaps else None,
    }


# ---- Trellis engine ---------------------------------------------------------------------------


def build_engine(loaded, args, kv_tokens: int, max_batch: int):
    """TorchEngine with the constructor arguments it has today, plus --engine-arg ones.
    Returns (engine, run_on_main): whether this process must drive engine.run() on its main thread."""
    from torch_engine.engine import TorchEngine

    params = inspect.signature(TorchEngine.__init__).parameters
    kwargs = {"max_batch_size": max_batch, "kv_cache_tokens": kv_tokens}
    if args.threads:
        kwargs["threads"] = args.threads
    kwargs.update(parse_engine_args(args.engine_arg))
    run_on_main = "start_thread" in params and "start_thread" not in kwargs and hasattr(TorchEngine, "run")
    if run_on_main:
        kwargs["start_thread"] = False
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(kwargs) - set(params))
        if unknown:
            raise SystemExit(f"--engine-arg: TorchEngine takes no {', '.join(unknown)} "
                             f"(it takes {', '.join(p for p in params if p not in ('self', 'loaded'))})")
    return TorchEngine(loaded, **kwargs), run_on_main


def prefill_counter(engine) -> int | None:
    for owner, name in ((getattr(engine, "stats", None), "prefill_tokens"), (engine, "prefill_tokens"),
                        (getattr(engine, "stats", None), "prompt_tokens")):
        value = getattr(owner, name, None) if owner is not None else None
        if isinstance(value, int):
            return value
    return None


def drive(engine, run_on_main: bool, client) -> dict:
    """Run the async client against the engine, then close it. With run_on_main the engine loop takes this
    (main) thread and the client's event loop a second one, as in the worker process."""
    if not run_on_main:
        try:
            return asyncio.run(client())
        finally:
            engine.close()
    box: list = []

    def client_thread() -> None:
        try:
            box.append(asyncio.run(client()))
        except BaseException as exc:  # noqa: BLE001 - re-raised on the main thread
            box.append(exc)
        finally:
            engine.close()

    thread = threading.Thread(target=client_thread, name="bench-client")
    thread.start()
    engine.run()
    thread.join()
    if isinstance(box[0], BaseException):
        raise box[0]
    return box[0]


async def engine_request(engine, task_id: str, ids: list[int], cfg, t0: float) -> tuple[float, float, int, list]:
    """One request: (ttft, latency, output tokens, gaps between consecutive token arrivals), from t0."""
    from worker_runtime.engine_api import Delta, Finished, PromptInput

    first = None
    tokens = 0
    last: dict[int, float] = {}
    gaps: list[float] = []
    async for event in engine.generate(task_id, PromptInput(token_ids=ids), cfg):
        now = time.perf_counter()
        if isinstance(event, Delta) and event.token_ids:
            tokens += len(event.token_ids)
            first = first or now
            if event.index in last:
                gaps.append((now - last[event.index]) / len(event.token_ids))
            last[event.index] = now
        elif isinstance(event, Finished):
            return first - t0, now - t0, tokens, gaps
    raise RuntimeError(f"{task_id}: stream ended without Finished")


def child_trellis(loaded, args, prompts: list[list[int]], warm: list[list[int]], n: int = 1,
                  one_at_a_time: bool = False) -> dict:
    from trellis_rpc.sampling import SamplingConfig

    kv_tokens = 2 * sum(len(p) + n * args.new_tokens for p in prompts + warm) + 1024
    engine, run_on_main = build_engine(loaded, args, kv_tokens, max(64, len(prompts), n))
    cfg = SamplingConfig(temperature=args.temperature, n=n, max_tokens=args.new_tokens, ignore_eos=True)
    warm_cfg = SamplingConfig(temperature=args.temperature, n=n, max_tokens=2, ignore_eos=True)

    async def client() -> dict:
        t0 = time.perf_counter()
        await asyncio.gather(*(engine_request(engine, f"warm{i}", p, warm_cfg, t0) for i, p in enumerate(warm)))
        before = prefill_counter(engine)
        if one_at_a_time:
            results = []
            start = time.perf_counter()
            for i, p in enumerate(prompts):
                results.append(await engine_request(engine, f"r{i}", p, cfg, time.perf_counter()))
        else:
            start = time.perf_counter()
            results = await asyncio.gather(*(engine_request(engine, f"r{i}", p, cfg, start)
                                             for i, p in enumerate(prompts)))
        wall = time.perf_counter() - start
        after = prefill_counter(engine)
        out = summarize([r[0] for r in results], [r[1] for r in results], [r[2] // n for r in results],
                        [g for r in results for g in r[3]], wall)
        out["tokens"] = sum(r[2] for r in results)
        out["compiled"] = bool(getattr(engine, "compiled", False))
        out["prefill_tokens"] = after - before if before is not None and after is not None else None
        return out

    return drive(engine, run_on_main, client)


# ---- Hugging Face generate --------------------------------------------------------------------


def hf_generate(model, tokenizer, prompts: list[list[int]], args, new_tokens: int) -> tuple[float, list[float], int]:
    """One static batch through `generate` (left padding); returns (start, times of each step's tokens, tokens/row)."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    class StepClock(BaseStreamer):
        """generate() puts the prompt first, then each step's new tokens (after sampling)."""

        def __init__(self) -> None:
            self.times: list[float] = []
            self.seen_prompt = False

        def put(self, value) -> None:
            if self.seen_prompt:
                self.times.append(time.perf_counter())
            self.seen_prompt = True

        def end(self) -> None:
            pass

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    clock = StepClock()
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=True, temperature=args.temperature, top_k=0, top_p=1.0, pad_token_id=pad,
                         streamer=clock)
    return start, clock.times, out.shape[1] - width


def child_hf(loaded, args, prompts: list[list[int]], warm: list[list[int]], one_at_a_time: bool) -> dict:
    import torch

    model, tok = loaded.model, loaded.tokenizer
    with torch.inference_mode():
        batches = [[p] for p in prompts] if one_at_a_time else [prompts]
        warm_batches = [[warm[0]]] if one_at_a_time else [warm]
        for batch in warm_batches:
            hf_generate(model, tok, batch, args, 2)
        ttft, latency, tokens, gaps = [], [], [], []
        start_all = time.perf_counter()
        for batch in batches:
            start, times, per_row = hf_generate(model, tok, batch, args, args.new_tokens)
            ttft += [times[0] - start] * len(batch)
            latency += [times[-1] - start] * len(batch)
            tokens += [per_row] * len(batch)
            gaps += [b - a for a, b in zip(times, times[1:], strict=False)]
        return summarize(ttft, latency, tokens, gaps, time.perf_counter() - start_all)


# ---- transformers continuous batching ---------------------------------------------------------


def child_hf_cb(loaded, args, prompts: list[list[int]], warm: list[list[int]]) -> dict:
    from transformers import ContinuousBatchingConfig, GenerationConfig

    model = loaded.model
    # EOS id -1 disables EOS (None would fall back to the model's). No top-k / top-p: plain sampling, like the others.
    gen = GenerationConfig(max_new_tokens=args.new_tokens, do_sample=True, temperature=args.temperature, top_k=0,
                           top_p=1.0, eos_token_id=-1, pad_token_id=loaded.tokenizer.pad_token_id)
    kv_tokens = 2 * sum(len(p) + args.new_tokens for p in prompts + warm) + 1024
    cb = ContinuousBatchingConfig(page_size=args.cb_page_size, num_blocks=math.ceil(kv_tokens / args.cb_page_size),
                                  max_batch_tokens=args.cb_max_batch_tokens,
                                  max_requests_per_batch=max(64, len(prompts)))
    info: dict = {}

    def collect(manager, ids: list[str]) -> dict:
        pending, results = set(ids), {}
        while pending:
            result = manager.get_result(timeout=1)
            if result is None:
                if not manager.is_running():
                    raise RuntimeError("continuous batching: the generation thread died")
                continue
            if result.request_id in pending and result.is_finished():
                if result.error:
                    raise RuntimeError(f"continuous batching: {result.error}")
                results[result.request_id] = result
                pending.discard(result.request_id)
        return results

    setup = time.perf_counter()
    with model.continuous_batching_context_manager(generation_config=gen, continuous_batching_config=cb) as manager:
        info["setup_s"] = time.perf_counter() - setup
        info["attn_implementation"] = model.config._attn_implementation
        collect(manager, manager.add_requests(inputs=warm, max_new_tokens=2))
        start = time.perf_counter()
        ids = manager.add_requests(inputs=prompts, max_new_tokens=args.new_tokens, record_timestamps=True)
        results = collect(manager, ids)
        wall = time.perf_counter() - start
    ttft, latency, tokens, gaps = [], [], [], []
    for rid in ids:
        stamps = results[rid].timestamps or []
        if not stamps:
            raise RuntimeError("continuous batching returned no timestamps")
        ttft.append(stamps[0] - start)
        latency.append(stamps[-1] - start)
        tokens.append(len(results[rid].generated_tokens))
        gaps += [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return summarize(ttft, latency, tokens, gaps, wall) | info


# ---- roofline ---------------------------------------------------------------------------------


def child_roofline(loaded) -> dict:
    import torch

    def best(fn, reps: int = 5) -> float:
        fn()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    def bandwidth() -> float:
        big = torch.ones(64 * 1024 * 1024)  # 256 MiB, far beyond the caches
        return big.numel() * big.element_size() / best(big.sum)

    peaks = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        m = torch.randn(2048, 2048).to(dtype)
        peaks[name] = 2 * 2048 ** 3 / best(lambda m=m: m @ m)
    params = {id(t): t for t in loaded.model.parameters()}  # tied embeddings count once
    return {"bandwidth": bandwidth(), "matmul_peak": peaks, "params": sum(t.numel() for t in params.values())}


def roofline_step(roof: dict, dtype: str, batch: int) -> float:
    weight_bytes = roof["params"] * (4 if dtype == "float32" else 2)
    return max(weight_bytes / roof["bandwidth"], 2 * roof["params"] * batch / roof["matmul_peak"][dtype])


# ---- llama.cpp ----------------------------------------------------------------------------------


def child_llamacpp(args, prompts: list[list[int]], warm: list[list[int]], one_at_a_time: bool = False) -> dict:
    """llama.cpp on the bundled .gguf itself (benchmarks/llamacpp_batch.py), same prompts and sampling."""
    import torch

    from benchmarks.llamacpp_batch import LlamaCppBatch, gguf_path

    ctx = sum(len(p) + args.new_tokens for p in prompts) + 256
    threads = args.threads or torch.get_num_threads()
    runner = LlamaCppBatch(gguf_path(), threads, max(1, len(prompts)), ctx, seed=args.seed)
    try:
        runner.run(warm, 2)
        batches = [[p] for p in prompts] if one_at_a_time else [prompts]
        ttft, latency, tokens, gaps = [], [], [], []
        start_all = time.perf_counter()
        for batch in batches:
            for start, times in runner.run(batch, args.new_tokens):
                ttft.append(times[0] - start)
                latency.append(times[-1] - start)
                tokens.append(len(times))
                gaps += [b - a for a, b in zip(times, times[1:], strict=False)]
        out = summarize(ttft, latency, tokens, gaps, time.perf_counter() - start_all)
        out["threads"] = threads
        return out
    finally:
        runner.close()


# ---- worker start -------------------------------------------------------------------------------


def child_worker_start(args) -> dict:
    """Seconds from launching `python -m worker_cpu` on the bundled model to SERVING: first with empty caches
    (the .gguf converted, the decode step compiled), then again with the caches that start left."""
    import tempfile

    from client.launcher import start_worker

    quantize = parse_engine_args(args.engine_arg).get("quantize", "auto")
    extra = ["--quantize", quantize, "--threads", str(args.threads or 2), "--no-verifier"]
    with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as logs:
        env = {**os.environ, "TRELLIS_CACHE": cache}
        env.pop("TORCHINDUCTOR_CACHE_DIR", None)
        seconds = []
        for attempt in range(2):
            t0 = time.perf_counter()
            worker = start_worker("default", Path(logs), extra=extra, env=env, name=f"start{attempt}")
            try:
                worker.wait_serving(timeout=600)
                seconds.append(time.perf_counter() - t0)
            finally:
                worker.stop()
    return {"first_s": seconds[0], "later_s": seconds[1]}


# ---- child entry ------------------------------------------------------------------------------


def run_child(args) -> None:
    import torch

    from torch_engine.model_loader import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    loaded = load_model("default", args.dtype)
    tok = loaded.tokenizer
    prompts = make_prompts(tok, args.requests, args.prompt_tokens)
    warm = make_prompts(tok, args.requests, args.prompt_tokens, offset=1000)
    system = args.child
    if args.mode:
        args.engine_arg = [f"quantize={args.mode!r}", *args.engine_arg]
    if system == "trellis":
        result = child_trellis(loaded, args, prompts, warm)
    elif system == "trellis_single":
        result = child_trellis(loaded, args, prompts[:args.single], warm[:1], one_at_a_time=True)
    elif system == "hf_static":
        result = child_hf(loaded, args, prompts, warm, one_at_a_time=False)
    elif system == "hf_single":
        result = child_hf(loaded, args, prompts[:args.single], warm, one_at_a_time=True)
    elif system == "hf_cb":
        result = child_hf_cb(loaded, args, prompts, warm)
    elif system == "llamacpp":
        result = child_llamacpp(args, prompts, warm)
    elif system == "llamacpp_single":
        result = child_llamacpp(args, prompts[:args.single], warm[:1], one_at_a_time=True)
    elif system == "worker_start":
        result = child_worker_start(args)
    elif system == "n16":
        prompt = make_prompts(tok, 1, args.n16_prompt_tokens, offset=2000)
        warm_prompt = make_prompts(tok, 1, args.n16_prompt_tokens, offset=3000)
        one = child_trellis(loaded, args, prompt, warm_prompt, n=1)
        many = child_trellis(loaded, args, prompt, warm_prompt, n=args.n16_samples)
        result = {"n": args.n16_samples, "prompt_tokens": len(prompt[0]),
                  "n1_s": one["wall_s"], "n1_tokens": one["tokens"], "n1_prefill": one["prefill_tokens"],
                  "nN_s": many["wall_s"], "nN_tokens": many["tokens"], "nN_prefill": many["prefill_tokens"]}
    else:
        result = child_roofline(loaded)
    result["peak_rss_mib"] = peak_rss_mib()
    result["threads"] = torch.get_num_threads()
    print(json.dumps(result), flush=True)


# ---- parent -----------------------------------------------------------------------------------


def child_command(args, system: str, repeat: int) -> list[str]:
    system, _, mode = system.partition(":")
    cmd = [sys.executable, "-m", "benchmarks.engine", "--child", system, "--seed", str(args.seed + repeat)]
    if mode:
        cmd += ["--mode", mode]
    for flag in ("dtype", "requests", "prompt_tokens", "new_tokens", "temperature", "single", "threads",
                 "n16_prompt_tokens", "n16_samples", "cb_page_size", "cb_max_batch_tokens"):
        cmd += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    for item in args.engine_arg:
        cmd += ["--engine-arg", item]
    return cmd


def run_system(args, system: str, repeat: int) -> dict:
    start = time.perf_counter()
    proc = subprocess.run(child_command(args, system, repeat), capture_output=True, text=True, cwd=REPO)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        err = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
        # The exception line, not the traceback's last frame.
        reason = next((ln for ln in reversed(err) if not ln.startswith(" ") and ":" in ln), err[-1] if err else "")
        result = {"error": f"exit {proc.returncode}: {reason.strip()}"}
    else:
        result = json.loads(lines[-1])
    print(f"  [{repeat + 1}/{args.repeats}] {system}: {time.perf_counter() - start:.0f} s"
          + (f" - {result['error']}" if "error" in result else ""), file=sys.stderr, flush=True)
    return result


def median_of(runs: list[dict], fn) -> float | None:
    values = [v for v in (fn(r) for r in runs) if v is not None]
    return statistics.median(values) if values else None


def fmt_ms(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    return f"{seconds * 1000:.0f} ms" if seconds >= 0.1 else f"{seconds * 1000:.1f} ms"


def fmt_ratio(r: float | None) -> str:
    if r is None:
        return "n/a"
    return f"{r:.1f}x" if r >= 0.95 else f"{r:.2f}x"


MODE_NAMES = {"none": "float32 weights", "int8": "int8 weights", "int4": "int4 weights"}
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_line() -> str:
    from torch_engine.cpu_dtype import cpu_flags

    flags = cpu_flags()
    model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("model name")), "unknown CPU") if Path("/proc/cpuinfo").exists() else "unknown CPU"
    have = [f for f in CPU_FLAGS if f in flags]
    capped = [f"{k}={os.environ[k]}" for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if os.environ.get(k)]
    return (f"CPU: {model}, {os.cpu_count()} cores; flags: {' '.join(have) or 'none of ' + ' '.join(CPU_FLAGS)}"
            f" (no {' '.join(f for f in CPU_FLAGS if f not in flags) or '-'})"
            + (f"; kernels capped by {' '.join(capped)}" if capped else "") + "\n")


def report(args, results: dict[str, list[dict]]) -> None:
    R, S = args.requests, args.single

    def mode_name(mode: str) -> str:
        """The weights, and whether the engine compiled its decode step (compile=auto, or an --engine-arg)."""
        compiled = any(r.get("compiled") for key, runs in results.items() if key.endswith(f":{mode}") for r in runs)
        return MODE_NAMES.get(mode, mode) + (", compiled step" if compiled else "")

    def label(key: str) -> str:
        system, _, mode = key.partition(":")
        base = {
            "trellis": f"Trellis engine, {R} concurrent requests",
            "hf_static": f"HF `generate`, static batch of {R}",
            "hf_cb": f"transformers continuous batching, {R} requests",
            "llamacpp": f"llama.cpp (the Q4_1 .gguf), {R} parallel sequences",
            "trellis_single": f"Trellis engine, one request at a time (first {S})",
            "hf_single": f"HF `generate`, one request at a time (first {S})",
            "llamacpp_single": f"llama.cpp (the Q4_1 .gguf), one request at a time (first {S})",
        }[system]
        return f"{base} ({mode_name(mode)})" if mode else base

    def ok(key: str) -> list[dict]:
        return [r for r in results.get(key, []) if "error" not in r]

    def tps(key: str) -> float | None:
        return median_of(ok(key), lambda r: r["tokens"] / r["wall_s"])

    def step(key: str) -> float | None:
        return median_of(ok(key), lambda r: r.get("step_s"))

    modes = [m.strip() for m in args.quantize.split(",") if m.strip()]
    print(f"SmolLM2-135M-Instruct, {args.dtype} activations, {torch_threads(results)} threads; {R} requests of "
          f"~{args.prompt_tokens} prompt tokens (+-12.5%), {args.new_tokens} sampled new tokens each (temperature "
          f"{args.temperature:g}, EOS ignored); {args.repeats} repeat(s), medians.\n")
    base = tps("hf_static")
    print(f"| system | output tokens/s | vs HF generate batch {R} | TTFT p50 | TTFT p99 | time/output token p50 "
          f"| peak RSS |")
    print("|---|---|---|---|---|---|---|")
    order = ["trellis", "hf_static", "hf_cb", "llamacpp", "trellis_single", "hf_single", "llamacpp_single"]
    shown = [k for system in order for k in results if k.partition(":")[0] == system]
    for key in shown:
        runs = ok(key)
        if not runs:
            print(f"| {label(key)} | failed: {results[key][0]['error'][:300]} | | | | | |")
            continue
        rate = tps(key)
        print(f"| {label(key)} | {rate:.1f} | {fmt_ratio(rate / base if base else None)} "
              f"| {fmt_ms(median_of(runs, lambda r: pct(r['ttft'], .5)))} "
              f"| {fmt_ms(median_of(runs, lambda r: pct(r['ttft'], .99)))} "
              f"| {fmt_ms(median_of(runs, lambda r: pct(r['tpot'], .5)))} "
              f"| {max(r['peak_rss_mib'] for r in runs):.0f} MiB |")
    for key in shown:
        if not ok(key):
            print(f"\nFailed: {label(key)}: {results[key][0]['error']}")
    cb = ok("hf_cb")
    if cb:
        print(f"\ntransformers continuous batching ran with attention `{cb[0].get('attn_implementation')}`, "
              f"page size {args.cb_page_size}, max batch tokens {args.cb_max_batch_tokens}; manager setup "
              f"{cb[0].get('setup_s', 0):.1f} s (not timed).")

    roof = ok("roofline")
    roof = roof[0] if roof else None
    ours = [f"{m}" for m in modes]
    print(f"\nDecode step (median gap between a request's consecutive tokens), {args.dtype} activations:\n")
    print("| batch | " + " | ".join(f"Trellis, {mode_name(m)}" for m in ours)
          + f" | HF `generate` | transformers CB | llama.cpp (Q4_1) | roofline ({args.dtype} weights) |")
    print("|---|" + "---|" * (len(ours) + 4))
    for batch, mine, hf, cbs, ll in ((1, "trellis_single", "hf_single", None, "llamacpp_single"),
                                     (R, "trellis", "hf_static", "hf_cb", "llamacpp")):
        cells = [fmt_ms(step(f"{mine}:{m}")) for m in ours]
        cells += [fmt_ms(step(hf)), fmt_ms(step(cbs)) if cbs else "-", fmt_ms(step(ll)),
                  fmt_ms(roofline_step(roof, args.dtype, batch)) if roof else "n/a"]
        print(f"| {batch} | " + " | ".join(cells) + " |")
    if roof:
        print(f"\nRoofline measured here: memory bandwidth {roof['bandwidth'] / 1e9:.1f} GB/s (sum of a 256 MiB "
              f"tensor), matmul peak fp32 {roof['matmul_peak']['float32'] / 1e9:.0f} GFLOP/s, bf16 "
              f"{roof['matmul_peak']['bfloat16'] / 1e9:.0f} GFLOP/s (2048^3); {roof['params'] / 1e6:.1f} M params; "
              f"step >= max(weight bytes / bandwidth, 2 * params * batch / matmul peak).")

    n16 = {m: ok(f"n16:{m}") for m in modes if ok(f"n16:{m}")}
    if n16:
        first = next(iter(n16.values()))[0]
        print(f"\nn={first['n']} samples of one {first['prompt_tokens']}-token prompt through the Trellis engine, "
              f"{args.new_tokens} new tokens each:\n")
        print("| weights | n=1 wall | n=N wall | ratio | prompt tokens prefilled (n=1 / n=N) |\n|---|---|---|---|---|")
        for m, runs in n16.items():
            n1, nN = median_of(runs, lambda r: r["n1_s"]), median_of(runs, lambda r: r["nN_s"])
            print(f"| {mode_name(m)} | {n1:.2f} s | {nN:.2f} s | {nN / n1:.2f}x "
                  f"| {runs[0]['n1_prefill']} / {runs[0]['nN_prefill']} |")
    starts = {m: ok(f"worker_start:{m}") for m in modes if ok(f"worker_start:{m}")}
    if starts:
        print("\nWorker start, `python -m worker_cpu` on the bundled model until SERVING (the verifier off):\n")
        print("| weights | first start (empty caches: convert, compile) | later start |\n|---|---|---|")
        for m, runs in starts.items():
            print(f"| {mode_name(m)} | {runs[0]['first_s']:.1f} s | {runs[0]['later_s']:.1f} s |")
    for key in results:
        if key.partition(":")[0] in ("n16", "worker_start") and not ok(key):
            print(f"\n{key} failed: {results[key][0]['error']}")
    targets(args, modes, tps, step, ok, mode_name)


def targets(args, modes: list[str], tps, step, ok, mode_name) -> None:
    """The issue 17 targets, as ratios from this run (best quantized mode where the target allows it)."""
    rows = []
    hf1, hfR, ll1, llR = step("hf_single"), tps("hf_static"), step("llamacpp_single"), tps("llamacpp")
    for m in modes:
        name = mode_name(m)
        s1, tR = step(f"trellis_single:{m}"), tps(f"trellis:{m}")
        if s1 and hf1:
            rows.append((f"batch-1 decode step <= 1/3 of HF generate's ({name})", f"{s1 / hf1:.2f}x",
                         s1 / hf1 <= 1 / 3))
        if tR and hfR:
            rows.append((f"tokens/s at {args.requests} concurrent >= 3x HF static batch ({name})",
                         f"{tR / hfR:.2f}x", tR / hfR >= 3))
        if s1 and ll1:
            rows.append((f"batch-1 step within 1.5x of llama.cpp's ({name})", f"{s1 / ll1:.2f}x", s1 / ll1 <= 1.5))
        if tR and llR:
            rows.append((f"tokens/s at {args.requests} concurrent >= llama.cpp's ({name})", f"{tR / llR:.2f}x",
                         tR >= llR))
        runs = ok(f"n16:{m}")
        if runs:
            ratio = median_of(runs, lambda r: r["nN_s"]) / median_of(runs, lambda r: r["n1_s"])
            rows.append((f"n=16 of one 512-token prompt <= 2x one sample ({name})", f"{ratio:.2f}x", ratio <= 2))
        runs = ok(f"worker_start:{m}")
        if runs:
            r = runs[0]
            rows.append((f"worker start < 60 s first, < 15 s later ({name})",
                         f"{r['first_s']:.0f} s / {r['later_s']:.0f} s", r["first_s"] < 60 and r["later_s"] < 15))
    if rows:
        print("\nAgainst the targets (ratios from this run):\n\n| target | measured | met |\n|---|---|---|")
        for target, value, met in rows:
            print(f"| {target} | {value} | {'yes' if met else 'no'} |")


def torch_threads(results: dict[str, list[dict]]) -> str:
    counts = {r["threads"] for runs in results.values() for r in runs if "threads" in r}
    return "/".join(str(c) for c in sorted(counts)) or "?"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=128, help="mean prompt length (each varies +-12.5%%)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--repeats", type=int, default=1, help="runs per system, interleaved; medians reported")
    p.add_argument("--only", default=",".join(SYSTEMS), help=f"comma-separated subset of {','.join(SYSTEMS)}")
    p.add_argument("--threads", type=int, default=0, help="torch threads in every system (0: torch's default)")
    p.add_argument("--single", type=int, default=4, help="requests timed one at a time (trellis_single, hf_single)")
    p.add_argument("--n16-prompt-tokens", type=int, default=512)
    p.add_argument("--n16-samples", type=int, default=16)
    p.add_argument("--cb-page-size", type=int, default=256, help="transformers CB page size (its default)")
    p.add_argument("--cb-max-batch-tokens", type=int, default=512,
                   help="transformers CB token budget per step (the Trellis engine's default max_num_tokens)")
    p.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra TorchEngine constructor argument (repeatable; value parsed as a Python literal)")
    p.add_argument("--quantize", default="none,int8",
                   help="comma-separated --quantize modes; each Trellis system runs once per mode (the decode step "
                        "compiled where the engine's compile=auto does it: quantized modes)")
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--child", choices=SYSTEMS, help=argparse.SUPPRESS)
    p.add_argument("--mode", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TRELLIS_CACHE", str(REPO / ".cache" / "trellis"))
    if args.child:
        run_child(args)
        return
    systems = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in systems if s not in SYSTEMS]
    if bad:
        p.error(f"--only: unknown system(s) {', '.join(bad)}; choose from {', '.join(SYSTEMS)}")
    parse_engine_args(args.engine_arg)  # fail early on a malformed one
    command = shlex.join([".venv/bin/python", "-m", "benchmarks.engine", *sys.argv[1:]])
    print(f"$ {command}\n", flush=True)
    modes = [m.strip() for m in args.quantize.split(",") if m.strip()]
    systems = [f"{s}:{m}" if s in TRELLIS_SYSTEMS else s for s in systems for m in (modes if s in TRELLIS_SYSTEMS
                                                                                        else [""])]
    print(cpu_line(), flush=True)
    results: dict[str, list[dict]] = {s: [] for s in systems}
    for repeat in range(args.repeats):
        for system in systems:
            if repeat and (system == "roofline" or system.startswith("worker_start")):
                continue
            results[system].append(run_system(args, system, repeat))
    report(args, results)


if __name__ == "__main__":
    main()
