"""The CPU engine in-process: greedy output equals Hugging Face generate across architectures and
batching situations, blocks are shared, preempted, freed; seeds reproduce."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from tests.helpers import eventually
from torch_engine.engine import TorchEngine
from torch_engine.model.quant import Int4Weight, Int8Weight, linear, quantize_int4, quantize_int8
from torch_engine.model_loader import LoadedModel
from trellis_rpc.sampling import SamplingConfig
from worker_runtime.engine_api import Delta, Finished, PromptInput, RunInfo

VOCAB = 400


def tiny(arch: str):
    torch.manual_seed(0)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            max_position_embeddings=256))
    if arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            max_position_embeddings=256))
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                                      bos_token_id=1, eos_token_id=2))


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path):
    return AutoTokenizer.from_pretrained(tiny_model)


def make_engine(arch: str, tokenizer, **kw) -> tuple[TorchEngine, object]:
    """The engine and the Hugging Face model it was built from (the reference)."""
    model = tiny(arch).eval()
    return TorchEngine(LoadedModel(model, tokenizer, f"tiny-{arch}", Path(".")), threads=1, **kw), model


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def prompts(count: int, length: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (length + 5 * i,), generator=g).tolist() for i in range(count)]


async def _collect(engine: TorchEngine, task_id: str, ids: list[int], cfg: SamplingConfig,
                   run: RunInfo | None = None):
    deltas, final = [], None
    async for event in engine.generate(task_id, PromptInput(token_ids=ids), cfg, run=run):
        if isinstance(event, Delta):
            deltas.append(event)
        elif isinstance(event, Finished):
            final = event
    return deltas, final


def run(engine: TorchEngine, jobs: list[tuple[list[int], SamplingConfig]]) -> list[Finished]:
    async def main():
        return await asyncio.gather(*(_collect(engine, f"t{i}", ids, cfg) for i, (ids, cfg) in enumerate(jobs)))
    return [final for _, final in asyncio.run(main())]


GREEDY = SamplingConfig(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_greedy_matches_hf_alone_and_batched(arch, tokenizer):
    engine, model = make_engine(arch, tokenizer)
    try:
        ps = prompts(4, 20)
        expected = [hf_greedy(model, p, 12) for p in ps]
        alone = run(engine, [(ps[0], GREEDY)])[0]
        assert alone.completions[0].token_ids == expected[0]
        together = run(engine, [(p, GREEDY) for p in ps])
        assert [f.completions[0].token_ids for f in together] == expected
    finally:
        engine.close()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("scheduling", ["fcfs", "run_las"])
def test_chunked_prefill_and_prefix_hits_keep_greedy_output(arch, tokenizer, scheduling):
    engine, model = make_engine(arch, tokenizer, max_num_tokens=7, block_size=4, scheduling=scheduling)
    try:
        p = prompts(1, 30)[0]
        expected = hf_greedy(model, p, 12)
        first = run(engine, [(p, GREEDY)])[0]
        assert first.completions[0].token_ids == expected
        assert first.cached_prompt_tokens == 0
        second = run(engine, [(p, GREEDY)])[0]
        assert second.completions[0].token_ids == expected
        assert second.cached_prompt_tokens == 28  # 7 full blocks of 4; the last token always runs
        # A longer prompt sharing the prefix hits too and still matches HF.
        longer = p + [5, 6, 7, 8, 9]
        third = run(engine, [(longer, GREEDY)])[0]
        assert third.cached_prompt_tokens >= 28
        assert third.completions[0].token_ids == hf_greedy(model, longer, 12)
    finally:
        engine.close()


@pytest.mark.parametrize("scheduling", ["fcfs", "run_las"])
def test_n_samples_prefill_once_and_share_blocks(tokenizer, scheduling):
    engine, model = make_engine("llama", tokenizer, block_size=8, scheduling=scheduling)
    try:
        p = prompts(1, 64)[0]
        cfg = SamplingConfig(n=16, max_tokens=10, ignore_eos=True, seed=3)
        done = run(engine, [(p, cfg)])[0]
        assert len(done.completions) == 16
        assert all(len(c.token_ids) == 10 for c in done.completions)
        assert engine.stats.prefill_tokens == len(p), "the prompt is prefilled once for all 16 samples"
        assert len({tuple(c.token_ids) for c in done.completions}) > 1
        assert engine.blocks.num_used == 0
        # Greedy n samples are all the HF greedy continuation.
        greedy = run(engine, [(p, SamplingConfig(n=3, temperature=0.0, max_tokens=10, ignore_eos=True))])[0]
        expected = hf_greedy(model, p, 10)
        assert [c.token_ids for c in greedy.completions] == [expected] * 3
    finally:
        engine.close()


@pytest.mark.parametrize("scheduling", ["fcfs", "run_las"])
def test_out_of_blocks_queues_and_preempts_instead_of_failing(tokenizer, scheduling):
    # 12 blocks of 4 tokens = 48 token slots; each request needs 20 + 16 = 36 at the end.
    engine, model = make_engine("llama", tokenizer, block_size=4, kv_cache_tokens=48, scheduling=scheduling)
    try:
        ps = prompts(3, 20, seed=9)
        cfg = SamplingConfig(temperature=0.0, max_tokens=16, ignore_eos=True)
        expected = [hf_greedy(model, p, 16) for p in ps]
        done = run(engine, [(p, cfg) for p in ps])
        assert [f.completions[0].token_ids for f in done] == expected
        assert engine.blocks.num_used == 0
    finally:
        engine.close()


def test_run_las_pausing_and_resuming_rows_keeps_greedy_output(tokenizer):
    """Three rows a step and six requests (one of three samples) under run_las. The first three belong to runs
    just below the first service level's 512 tokens: once prefilled they are demoted, paused for the runs behind
    them, and resumed later; each request still gets exactly the HF greedy continuation."""
    engine, model = make_engine("llama", tokenizer, max_batch_size=3, block_size=4, scheduling="run_las")
    try:
        ps = prompts(6, 12, seed=4)
        cfgs = [SamplingConfig(temperature=0.0, max_tokens=10, ignore_eos=True, n=3 if i == 4 else 1)
                for i in range(6)]

        runs = [RunInfo(f"run{i}", tokens=505 if i < 3 else 0) for i in range(6)]

        async def main():
            return await asyncio.gather(*(_collect(engine, f"t{i}", p, cfg, run)
                                          for i, (p, cfg, run) in enumerate(zip(ps, cfgs, runs, strict=True))))
        done = [final for _, final in asyncio.run(main())]
        for p, cfg, final in zip(ps, cfgs, done, strict=True):
            assert [c.token_ids for c in final.completions] == [hf_greedy(model, p, 10)] * cfg.n
        assert engine.stats.pauses > 0, "rows changed hands between running requests"
        assert engine.blocks.num_used == 0
    finally:
        engine.close()


@pytest.mark.parametrize("quantize,compile", [
    ("none", "off"), ("int8", "off"), ("int4", "off"),
    pytest.param("int8", "on", marks=pytest.mark.processes),  # inductor runs g++
])
def test_seed_reproduces_whatever_else_is_in_the_batch(tokenizer, quantize, compile):
    engine, _ = make_engine("qwen2", tokenizer, quantize=quantize, compile=compile)
    try:
        p, other = prompts(2, 16, seed=4)
        cfg = SamplingConfig(n=2, max_tokens=12, seed=42, ignore_eos=True, top_k=50, top_p=0.9)
        alone = run(engine, [(p, cfg)])[0]
        busy = run(engine, [(other, SamplingConfig(max_tokens=30, ignore_eos=True)), (p, cfg),
                            (other, SamplingConfig(n=3, max_tokens=5, ignore_eos=True))])[1]
        assert [c.token_ids for c in busy.completions] == [c.token_ids for c in alone.completions]
    finally:
        engine.close()


def test_cancel_frees_blocks_at_the_next_step(tokenizer):
    engine, _ = make_engine("llama", tokenizer)

    async def main():
        stream = engine.generate("long", PromptInput(token_ids=prompts(1, 30)[0]),
                                 SamplingConfig(n=4, max_tokens=200, ignore_eos=True))
        seen = 0
        async for event in stream:
            if isinstance(event, Delta):
                seen += 1
                if seen == 8:
                    assert engine.load().kv_blocks_used > 0
                    engine.cancel("long")
            elif isinstance(event, Finished):
                return event

    try:
        done = asyncio.run(main())
        assert all(c.finish_reason == "cancelled" for c in done.completions)
        assert engine.load().kv_blocks_used == 0 and engine.load().running_sequences == 0
    finally:
        engine.close()


def test_bf16_agrees_with_fp32(tokenizer):
    model = tiny("llama").eval()
    ps = prompts(3, 24, seed=2)
    with torch.inference_mode():
        ref = [model(torch.tensor([p])).logits[0, -1].softmax(-1) for p in ps]
    engine = TorchEngine(LoadedModel(model.to(torch.bfloat16), tokenizer, "tiny-bf16", Path(".")), threads=1)
    try:
        cfg = SamplingConfig(temperature=0.0, max_tokens=1, logprobs=5)
        done = run(engine, [(p, cfg) for p in ps])
        for probs, f in zip(ref, done, strict=True):
            lp = f.completions[0].logprobs[0]
            top_fp32 = probs.topk(5).indices.tolist()
            assert lp.token_id == top_fp32[0] or probs[lp.token_id] > probs[top_fp32[0]] - 0.02
            for alt in lp.top:
                assert abs(torch.tensor(alt.logprob).exp() - probs[alt.token_id]) < 0.02
    finally:
        engine.close()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_quantized_weights_agree_with_fp32(arch, tokenizer, quantize):
    """--quantize int8 (weights and activations) and int4 (weights in groups of 32; the lm_head int8): every
    linear; next-token probabilities within 0.02 of the float32 model's, the greedy token the same or as likely
    within 0.02."""
    engine, model = make_engine(arch, tokenizer, quantize=quantize, compile="off")
    kind = Int8Weight if quantize == "int8" else Int4Weight
    ps = prompts(3, 24, seed=2)
    with torch.inference_mode():
        ref = [model(torch.tensor([p])).logits[0, -1].softmax(-1) for p in ps]
    try:
        assert isinstance(engine.decoder.w.lm_head, Int8Weight)
        assert all(isinstance(layer.up, kind) for layer in engine.decoder.w.layers)
        done = run(engine, [(p, SamplingConfig(temperature=0.0, max_tokens=1, logprobs=5)) for p in ps])
        for probs, f in zip(ref, done, strict=True):
            lp = f.completions[0].logprobs[0]
            assert lp.token_id == int(probs.argmax()) or probs[lp.token_id] > probs.max() - 0.02
            for alt in lp.top:
                assert abs(torch.tensor(alt.logprob).exp() - probs[alt.token_id]) < 0.02
    finally:
        engine.close()


@pytest.mark.processes  # inductor runs g++
@pytest.mark.parametrize("arch,quantize", [("llama", "none"), ("qwen2", "int8"), ("gpt2", "int8"), ("llama", "int4")])
def test_compiled_decode_step_gives_the_eager_step_s_output(arch, tokenizer, quantize):
    """--compile on: decode rows through the compiled graph, alone, batched, beside prefill chunks (a short
    token budget makes steps mix them) and after preemption, give the eager engine's greedy tokens and
    logprobs within float tolerance; without quantization, HF generate's tokens."""
    compiled, model = make_engine(arch, tokenizer, quantize=quantize, compile="on", max_num_tokens=24,
                                  block_size=4, kv_cache_tokens=160)
    eager, _ = make_engine(arch, tokenizer, quantize=quantize, compile="off", max_num_tokens=24,
                           block_size=4, kv_cache_tokens=160)
    try:
        assert compiled.compiled and compiled.decoder.compiled is not None and not eager.compiled
        ps = prompts(4, 20, seed=5)
        cfg = SamplingConfig(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=3)
        alone = run(compiled, [(ps[0], cfg)])[0].completions[0]
        together = [f.completions[0] for f in run(compiled, [(p, cfg) for p in ps])]
        reference = [f.completions[0] for f in run(eager, [(p, cfg) for p in ps])]
        assert alone.token_ids == together[0].token_ids
        assert [c.token_ids for c in together] == [c.token_ids for c in reference]
        for got, want in zip(together, reference, strict=True):
            for a, b in zip(got.logprobs, want.logprobs, strict=True):
                assert abs(a.logprob - b.logprob) < 1e-2
        if quantize == "none":
            assert [c.token_ids for c in together] == [hf_greedy(model, p, 16) for p in ps]
        assert compiled.stats.preemptions > 0, "160 KV slots for 4 x 36 tokens of blocks of 4 must preempt"
        assert compiled.blocks.num_used == 0
    finally:
        compiled.close()
        eager.close()


def test_without_a_working_compiler_auto_serves_eagerly_and_on_refuses(tokenizer, monkeypatch):
    """--compile auto on a machine with no C++ compiler, or whose compile fails, still gives a working engine;
    --compile on says it failed."""
    from torch_engine.model import compiled_decode

    monkeypatch.setattr(compiled_decode.shutil, "which", lambda name: None)
    engine, _ = make_engine("llama", tokenizer, quantize="int8", compile="auto")
    try:
        assert not engine.compiled and engine.decoder.compiled is None
    finally:
        engine.close()
    monkeypatch.undo()

    def broken(self, kv, max_rows):
        raise RuntimeError("C++ compile failed")

    monkeypatch.setattr(compiled_decode.CompiledDecode, "warm_up", broken)
    engine, _ = make_engine("llama", tokenizer, quantize="int8", compile="auto")
    try:
        assert not engine.compiled and engine.decoder.compiled is None
        assert len(run(engine, [(prompts(1, 10)[0], GREEDY)])[0].completions[0].token_ids) == 12
    finally:
        engine.close()
    with pytest.raises(RuntimeError, match="C\\+\\+ compile failed"):
        make_engine("llama", tokenizer, quantize="int8", compile="on")


def test_int4_groups_find_a_q4_grid_again_and_rows_do_not_depend_on_their_company():
    """Weights already on a 4-bit grid per group of 32 (as a dequantized Q4_1 .gguf's are) come back exactly (up to
    the bfloat16 scales); a row's output is the same alone as in a batch of 32."""
    g = torch.Generator().manual_seed(0)
    scale, low = torch.rand(48, 2, 1, generator=g) + 0.1, torch.randn(48, 2, 1, generator=g)
    w = (low + scale * torch.randint(0, 16, (48, 2, 32), generator=g)).view(48, 64)
    w[:, 0::32], w[:, 1::32] = low[:, :, 0], (low + 15 * scale)[:, :, 0]   # every group spans its whole grid
    q = quantize_int4(w)
    assert isinstance(q, Int4Weight)
    eye = torch.eye(64)
    assert torch.allclose(linear(eye, q).t(), w, atol=0.02 * w.abs().max())
    x = torch.randn(32, 64, generator=g)
    assert torch.equal(linear(x[:1], q)[0], linear(x, q)[0])
    assert isinstance(quantize_int4(torch.randn(8, 40)), Int8Weight), "rows not a multiple of 32 fall back to int8"


def test_int8_quantization_is_within_half_a_step_per_channel():
    w = torch.randn(32, 48) * torch.linspace(0.01, 3, 32)[:, None]    # channels of very different ranges
    q = quantize_int8(w)
    assert q.q.dtype == torch.int8 and q.scales.shape == (32,)
    assert ((q.q.float() * q.scales[:, None] - w).abs() <= q.scales[:, None] / 2 + 1e-6).all()
    x = torch.randn(5, 48)
    exact = x @ (q.q.float() * q.scales[:, None]).T
    # activations are int8 per row too: within a step per row of the exact product
    assert (linear(x, q) - exact).abs().max() < 0.05 * exact.abs().max()
    # a row's result is the same whatever rows it is batched with
    assert torch.equal(linear(x[2:3], q), linear(x, q)[2:3])


def _generate(engine, task_id, ids, cfg, source=None, keep=None):
    async def main():
        final = None
        async for event in engine.generate(task_id, PromptInput(token_ids=ids), cfg, source, keep):
            if isinstance(event, Finished):
                final = event
        return final
    return asyncio.run(main())


def test_kept_sequence_continues_and_forks_without_prefilling_again(tokenizer):
    from trellis_rpc.errors import StatusError
    from worker_runtime.engine_api import SequenceSource

    engine, model = make_engine("llama", tokenizer, block_size=4)
    try:
        p = prompts(1, 22)[0]
        first = _generate(engine, "a", p, GREEDY, keep=30.0)
        handle = first.handles[0]
        kept_tokens = p + first.completions[0].token_ids
        assert engine.load().kept_sequences == 1 and engine.load().kv_blocks_used > 0
        before = engine.stats.prefill_tokens
        appended = [7, 8, 9]
        forked = _generate(engine, "b", appended, SamplingConfig(n=3, temperature=0.0, max_tokens=8, ignore_eos=True),
                           source=SequenceSource(handle, fork=True))
        expected = hf_greedy(model, kept_tokens + appended, 8)
        assert [c.token_ids for c in forked.completions] == [expected] * 3
        # Only the last generated token (never run) and the appended ones went through the model.
        assert engine.stats.prefill_tokens - before == 1 + len(appended)
        assert forked.cached_prompt_tokens == len(kept_tokens) - 1
        # The fork left the kept sequence in place; a continuation uses it up.
        cont = _generate(engine, "c", [], SamplingConfig(temperature=0.0, max_tokens=5, ignore_eos=True),
                         source=SequenceSource(handle))
        assert cont.completions[0].token_ids == hf_greedy(model, kept_tokens, 5)
        with pytest.raises(StatusError) as info:
            _generate(engine, "d", [], GREEDY, source=SequenceSource(handle))
        assert info.value.field == "generate.source"
        assert engine.load().kept_sequences == 0 and engine.blocks.num_used == 0
    finally:
        engine.close()


def test_an_operator_context_cap_below_the_model_s_refuses_and_stops_there(tokenizer):
    from trellis_rpc.errors import StatusError

    engine, _ = make_engine("llama", tokenizer, max_context=32)
    try:
        assert engine.max_context == 32 and engine.info.max_context_tokens == 32
        with pytest.raises(StatusError) as info:
            _generate(engine, "long", prompts(1, 40)[0], GREEDY)
        assert (info.value.field, info.value.reason) == ("prompt", "CONTEXT_LENGTH_EXCEEDED")
        done = _generate(engine, "fits", prompts(1, 28)[0], SamplingConfig(temperature=0.0, max_tokens=50,
                                                                             ignore_eos=True))
        completion = done.completions[0]
        assert completion.finish_reason == "length" and 28 + len(completion.token_ids) == 32
    finally:
        engine.close()


def test_a_task_id_used_again_replaces_what_it_kept_and_leaks_nothing(tokenizer):
    """Found by tests/test_fuzz_worker.py: a second task under a finished task's id, both keeping, overwrote the
    first kept sequence's entry and left its blocks referenced by nothing, for good."""
    engine, _ = make_engine("llama", tokenizer, block_size=4)
    try:
        keep = SamplingConfig(temperature=0.0, max_tokens=4, ignore_eos=True)
        first = _generate(engine, "again", prompts(1, 10)[0], keep, keep=30.0)
        second = _generate(engine, "again", prompts(1, 14, seed=2)[0], keep, keep=30.0)
        assert first.handles == second.handles and engine.load().kept_sequences == 1
        engine.release("again")
        eventually(lambda: engine.blocks.num_used == 0)
        assert engine.load().kept_sequences == 0 and engine.blocks.num_used == 0
    finally:
        engine.close()


def test_release_drops_what_one_run_kept_and_nothing_else(tokenizer):
    engine, _ = make_engine("llama", tokenizer, block_size=4)
    try:
        p = prompts(1, 10)[0]
        for task_id in ("run.a/0", "run.a/1", "run.ab/0"):   # "run.ab" shares a string prefix, not the run
            _generate(engine, task_id, p, SamplingConfig(n=2, temperature=0.0, max_tokens=4, ignore_eos=True),
                      keep=30.0)
        assert engine.load().kept_sequences == 6
        engine.release("run.a")
        eventually(lambda: engine.load().kept_sequences == 2)   # at the engine thread's next step
        assert engine.load().kept_sequences == 2 and sorted(engine.kept.handles()) == ["run.ab/0/0", "run.ab/0/1"]
        engine.release("run.ab")
        eventually(lambda: engine.blocks.num_used == 0)
        assert engine.load().kept_sequences == 0 and engine.blocks.num_used == 0
    finally:
        engine.close()


def test_kept_sequences_are_evicted_first_and_fall_back_to_the_prefix_cache(tokenizer):
    from worker_runtime.engine_api import SequenceSource

    # 16 blocks of 4 tokens: the kept sequence (~34 tokens, 9 blocks) must give way to a 40-token request.
    engine, model = make_engine("llama", tokenizer, block_size=4, kv_cache_tokens=64)
    try:
        p = prompts(1, 22, seed=5)[0]
        kept = _generate(engine, "k", p, GREEDY, keep=30.0)
        kept_tokens = p + kept.completions[0].token_ids
        other = prompts(1, 40, seed=6)[0]
        big = _generate(engine, "big", other, SamplingConfig(temperature=0.0, max_tokens=8, ignore_eos=True))
        assert big.completions[0].token_ids == hf_greedy(model, other, 8)
        assert engine.load().kept_sequences == 0, "the kept sequence's blocks were reclaimed"
        cont = _generate(engine, "c", [11], SamplingConfig(temperature=0.0, max_tokens=6, ignore_eos=True),
                         source=SequenceSource(kept.handles[0]))
        assert cont.completions[0].token_ids == hf_greedy(model, kept_tokens + [11], 6)
    finally:
        engine.close()
