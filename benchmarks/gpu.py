"""The GPU worker's engines against Hugging Face `generate` on CUDA: same model, same requests.

    python -m benchmarks.gpu                          # torch engine vs HF generate (+ TensorRT-LLM if installed)
    python -m benchmarks.gpu --model /models/Qwen2.5-1.5B-Instruct --requests 128 --new-tokens 256
    python -m benchmarks.gpu --only trtllm,hf --repeats 3

Needs a CUDA machine. Each system runs in a child process of its own (`--child SYSTEM`, one JSON line
back), so each starts with the whole GPU; with --repeats the systems are interleaved and medians
reported. Workload: --requests distinct prompts of about --prompt-tokens tokens (benchmarks.engine's
deterministic prompts), each sampling exactly --new-tokens tokens (EOS ignored), all submitted at once.

- torch:  Trellis' own engine (torch_engine's TorchEngine) with the model on CUDA, as `worker_gpu --engine torch`;
- trtllm: TensorRT-LLM's LLM API through worker_gpu's adapter, as `worker_gpu` runs it (skipped when
          tensorrt_llm is not installed);
- hf:     HF `generate`, one static batch of all requests (left padding), on CUDA.

Reported: output tokens/s (all output tokens / wall time), TTFT p50 and time per output token p50.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import statistics
import subprocess
import sys
import time

from benchmarks.engine import engine_request, make_prompts, pct, summarize

SYSTEMS = ("torch", "trtllm", "hf")


def worker_args(args: argparse.Namespace, engine: str) -> argparse.Namespace:
    from worker_gpu.cli import parse_args

    return parse_args(["--engine", engine, "--model", args.model, "--dtype", args.dtype,
                       "--max-batch-size", str(max(64, args.requests)), "--kv-cache-tokens",
                       str(2 * args.requests * (args.prompt_tokens + args.new_tokens) + 4096), "--no-verifier"])


def run_engine(engine, prompts: list[list[int]], warm: list[list[int]], args: argparse.Namespace) -> dict:
    from trellis_rpc.sampling import SamplingConfig

    cfg = SamplingConfig(temperature=args.temperature, max_tokens=args.new_tokens, ignore_eos=True)
    warm_cfg = SamplingConfig(temperature=args.temperature, max_tokens=2, ignore_eos=True)

    async def client() -> dict:
        t0 = time.perf_counter()
        await asyncio.gather(*(engine_request(engine, f"warm{i}", p, warm_cfg, t0) for i, p in enumerate(warm)))
        start = time.perf_counter()
        results = await asyncio.gather(*(engine_request(engine, f"r{i}", p, cfg, start)
                                         for i, p in enumerate(prompts)))
        return summarize([r[0] for r in results], [r[1] for r in results], [r[2] for r in results],
                         [g for r in results for g in r[3]], time.perf_counter() - start)

    try:
        return asyncio.run(client())
    finally:
        engine.close()


def child_hf(args: argparse.Namespace, prompts: list[list[int]], warm: list[list[int]]) -> dict:
    import torch

    from torch_engine.model_loader import load_model

    loaded = load_model(args.model, "bfloat16" if args.dtype == "auto" else args.dtype)
    model, tok = loaded.model.to("cuda"), loaded.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def generate(batch: list[list[int]], new_tokens: int) -> tuple[float, float, float]:
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device="cuda")
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device="cuda")
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(ids, attention_mask=mask, max_new_tokens=1, min_new_tokens=1, do_sample=True,
                       temperature=args.temperature, top_k=0, pad_token_id=pad)
        torch.cuda.synchronize()
        first = time.perf_counter()
        model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=True, temperature=args.temperature, top_k=0, top_p=1.0, pad_token_id=pad)
        torch.cuda.synchronize()
        return start, first, time.perf_counter()

    with torch.inference_mode():
        generate(warm, 2)
        _, first, _ = generate(prompts, 1)   # TTFT: one step over the batch
        start, _, end = generate(prompts, args.new_tokens)
    ttft = first - start if first > start else 0.0
    n = len(prompts)
    return summarize([ttft] * n, [end - start] * n, [args.new_tokens] * n, [], end - start)


def run_child(args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    from torch_engine.model_loader import convert_gguf, resolve

    path = resolve(args.model)
    tok = AutoTokenizer.from_pretrained(convert_gguf(path) if path.is_file() else path)
    prompts = make_prompts(tok, args.requests, args.prompt_tokens)
    warm = make_prompts(tok, min(8, args.requests), args.prompt_tokens, offset=args.requests)
    if args.child == "hf":
        out = child_hf(args, prompts, warm)
    elif args.child == "torch":
        from worker_gpu.torch_engine import build_torch

        engine, _ = build_torch(worker_args(args, "torch"))
        out = run_engine(engine, prompts, warm, args)
    else:
        from worker_gpu.trtllm_engine import build_trtllm

        engine, _ = build_trtllm(worker_args(args, "tensorrt-llm"))
        out = run_engine(engine, prompts, warm, args)
    print(json.dumps(out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--dtype", default="bfloat16", choices=["auto", "float16", "bfloat16", "float32"])
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--only", default=",".join(SYSTEMS))
    p.add_argument("--child", choices=SYSTEMS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        run_child(args)
        return
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.gpu needs a CUDA device (torch.cuda.is_available() is False here)")
    systems = [s.strip() for s in args.only.split(",")]
    if "trtllm" in systems and importlib.util.find_spec("tensorrt_llm") is None:
        print("tensorrt_llm is not installed: skipping trtllm", file=sys.stderr)
        systems.remove("trtllm")
    passthrough = [a for a in sys.argv[1:] if not a.startswith("--only") and a != args.only]
    results: dict[str, list[dict]] = {s: [] for s in systems}
    for _ in range(args.repeats):
        for system in systems:
            out = subprocess.run([sys.executable, "-m", "benchmarks.gpu", *passthrough, "--child", system],
                                 capture_output=True, text=True, check=True)
            results[system].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"$ python -m benchmarks.gpu {' '.join(sys.argv[1:])}  ({torch.cuda.get_device_name()})\n")
    print("| system | output tokens/s | vs hf | TTFT p50 | TPOT p50 |\n|---|---|---|---|---|")
    rate = {s: statistics.median(r["tokens"] / r["wall_s"] for r in runs) for s, runs in results.items()}
    for system, runs in results.items():
        ttft = statistics.median(pct(r["ttft"], 0.5) for r in runs) * 1000
        tpot = statistics.median(pct(r["tpot"], 0.5) for r in runs) * 1000
        versus = f"{rate[system] / rate['hf']:.2f}x" if "hf" in rate else "-"
        print(f"| {system} | {rate[system]:,.0f} | {versus} | {ttft:.0f} ms | {tpot:.1f} ms |")


if __name__ == "__main__":
    main()
