"""What --quantize int8 and int4 cost in quality on the bundled model: greedy continuations against float32's.

    .venv/bin/python -m benchmarks.quant_quality                 # 48 eval prompts, 64 tokens, int8 and int4
    .venv/bin/python -m benchmarks.quant_quality --prompts 96 --tokens 64 --modes int8

The eval prompts (benchmarks/data/arith.jsonl, "<question> Answer with the final number." through the chat
template), greedy, --tokens new tokens each, EOS ignored, through TorchEngine in float32 and in each mode (as the
worker runs it: quantized modes with their decode step compiled; the teacher-forced prefixes hit the prefix cache,
so their last token runs as a decode row). Float32 here is the .gguf's Q4_1 weights dequantized, so it is the
file's own model. Reported per mode:
- greedy agreement, teacher-forced: at each position of float32's continuation, whether int8's greedy token
  given the same prefix (prompt + float32's tokens before it) is float32's token;
- prefix agreement: the share of positions before int8's own continuation first differs from float32's
  (a near-tie flipped early counts every later position as a miss);
- the mean absolute difference of float32's token's log-probability under the two, over those positions.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
from pathlib import Path

from torch_engine.engine import TorchEngine
from torch_engine.model_loader import load_model
from trellis_rpc.sampling import SamplingConfig
from worker_runtime.engine_api import Finished, PromptInput

DATA = Path(__file__).parent / "data" / "arith.jsonl"


async def forced(engine: TorchEngine, prefixes: list[list[int]]) -> list[Finished]:
    """One greedy token, with its top logprobs, after each prefix."""
    cfg = SamplingConfig(temperature=0.0, max_tokens=1, ignore_eos=True, logprobs=20)

    async def one(i: int, ids: list[int]) -> Finished:
        async for event in engine.generate(f"f{i}", PromptInput(token_ids=ids), cfg):
            if isinstance(event, Finished):
                return event
        raise RuntimeError("no result")

    return await asyncio.gather(*(one(i, ids) for i, ids in enumerate(prefixes)))


async def greedy(engine: TorchEngine, prompts: list[str], tokens: int) -> list[Finished]:
    cfg = SamplingConfig(temperature=0.0, max_tokens=tokens, ignore_eos=True, logprobs=0)

    async def one(i: int, text: str) -> Finished:
        async for event in engine.generate(f"q{i}", PromptInput(chat=[{"role": "user", "content": text}]), cfg):
            if isinstance(event, Finished):
                return event
        raise RuntimeError("no result")

    return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=48)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--modes", default="int8,int4", help="comma-separated --quantize modes to compare with none")
    args = p.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    rows = [json.loads(line) for line in DATA.read_text().splitlines()[:args.prompts]]
    prompts = [f"{r['question']} Answer with the final number." for r in rows]
    results, prefixes, forced_out, compiled = {}, [], {}, False
    for mode in ("none", *modes):
        # compile="auto", as the worker runs: the int8 engine's decode step compiled, float32's eager.
        engine = TorchEngine(load_model("default", "float32"), quantize=mode)
        compiled = compiled or engine.compiled
        try:
            results[mode] = [f.completions[0] for f in asyncio.run(greedy(engine, prompts, args.tokens))]
            if not prefixes:
                for text, ref in zip(prompts, results["none"], strict=True):
                    ids = engine.tokenize(PromptInput(chat=[{"role": "user", "content": text}]))
                    prefixes += [ids + ref.token_ids[:k] for k in range(len(ref.token_ids))]
            forced_out[mode] = [f.completions[0] for f in asyncio.run(forced(engine, prefixes))]
        finally:
            engine.close()
    targets = [t for ref in results["none"] for t in ref.token_ids]
    print(f"SmolLM2-135M-Instruct, {len(prompts)} eval prompts, {args.tokens} greedy tokens, against float32"
          f"{' (quantized modes with the compiled decode step)' if compiled else ''}:")
    for mode in modes:
        forced_agree = sum(q.token_ids[0] == t for q, t in zip(forced_out[mode], targets, strict=True))
        dlp = []
        for ref, q, t in zip(forced_out["none"], forced_out[mode], targets, strict=True):
            ref_lp = {x.token_id: x.logprob for x in ref.logprobs[0].top}
            q_lp = {x.token_id: x.logprob for x in q.logprobs[0].top}
            if t in ref_lp and t in q_lp:
                dlp.append(abs(ref_lp[t] - q_lp[t]))
        prefix = 0
        for ref, q in zip(results["none"], results[mode], strict=True):
            prefix += next((i for i, (a, b) in enumerate(zip(ref.token_ids, q.token_ids, strict=False)) if a != b),
                           len(ref.token_ids))
        print(f"  {mode}: greedy agreement, teacher-forced: {forced_agree / len(targets):.1%} of {len(targets)} "
              f"tokens; prefix agreement: {prefix / len(targets):.1%}; mean |log p - log p(float32)| of float32's "
              f"token: {statistics.mean(dlp):.4f}")


if __name__ == "__main__":
    main()
