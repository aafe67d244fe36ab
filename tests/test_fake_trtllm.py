"""Pins the TensorRT-LLM test double (tests/fakes/tensorrt_llm) to the LLM API it mirrors (1.3.0rc24,
commit 1f064c46): streaming diffs, abort, stop strings and stop tokens, SamplingParams validation, LLM
kwarg validation, iteration stats and context logits, over the tiny random Llama."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest
import torch

FAKES = Path(__file__).parent / "fakes"


@pytest.fixture(scope="module")
def trt():
    """The fake package, importable as `tensorrt_llm` for this module only."""
    sys.path.insert(0, str(FAKES))
    try:
        import tensorrt_llm

        assert Path(tensorrt_llm.__file__).is_relative_to(FAKES)
        yield tensorrt_llm
    finally:
        sys.path.remove(str(FAKES))
        for name in [m for m in sys.modules if m == "tensorrt_llm" or m.startswith("tensorrt_llm.")]:
            del sys.modules[name]


@pytest.fixture(scope="module")
def llm(trt, tiny_model):
    from tensorrt_llm.llmapi import KvCacheConfig

    with trt.LLM(str(tiny_model), max_batch_size=8, enable_iter_perf_stats=True,
                 kv_cache_config=KvCacheConfig(free_gpu_memory_fraction=0.5, tokens_per_block=4)) as llm:
        yield llm


def stream(llm, prompt, params):
    """Every yield of a streaming request: (the object, [(text_diff, token_ids_diff, logprobs_diff), ...])."""
    async def go():
        output = llm.generate_async(prompt, params, streaming=True)
        steps = []
        async for step in output:
            assert step is output
            steps.append([(o.text_diff, list(o.token_ids_diff), list(o.logprobs_diff)) for o in step.outputs])
        return output, steps
    return asyncio.run(go())


def greedy_text(trt, llm, prompt: str, max_tokens: int = 24):
    out = llm.generate(prompt, trt.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    return out.outputs[0]


def test_surface_and_version(trt):
    from tensorrt_llm.executor.result import CompletionOutput, Logprob
    from tensorrt_llm.llmapi import LLM, RequestOutput, SamplingParams
    from tensorrt_llm.sampling_params import SamplingParams as OldPathSamplingParams

    assert trt.__version__ == "1.3.0rc24" and trt.LLM is LLM and OldPathSamplingParams is SamplingParams
    assert "test double" in trt.__doc__.lower() and "1f064c46" in trt.__doc__
    sp = SamplingParams()
    assert sp.max_tokens == 32 and sp.seed is None and sp.best_of == 1 and sp.skip_special_tokens
    assert Logprob(-0.5).rank is None and CompletionOutput(0).length == 0
    with pytest.raises(TypeError):
        SamplingParams(16)                      # keyword-only
    with pytest.raises(TypeError):
        SamplingParams(random_seed=1)           # unknown field (it is `seed`)
    with pytest.raises(RuntimeError):
        RequestOutput()                         # built by the LLM only


def test_greedy_follows_the_hugging_face_model(trt, llm, tiny_model):
    from transformers import AutoModelForCausalLM

    out = llm.generate("The quick brown fox", trt.SamplingParams(max_tokens=12, temperature=0.0, min_tokens=12))
    hf = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    ids = torch.tensor([out.prompt_token_ids])
    want = hf.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)[0, ids.shape[1]:]
    assert out.outputs[0].token_ids == want.tolist()
    assert out.finished and out.outputs[0].finish_reason == "length" and out.outputs[0].stop_reason is None
    assert out.prompt == "The quick brown fox" and out.outputs[0].text == llm.tokenizer.decode(want.tolist())


def test_streaming_diffs_add_up_to_the_final_output(trt, llm):
    params = trt.SamplingParams(max_tokens=10, temperature=0.8, seed=7, logprobs=2, ignore_eos=True)
    output, steps = stream(llm, {"prompt_token_ids": [266, 300, 274]}, params)
    final = output.outputs[0]
    assert output.prompt is None and output.finished and len(steps) == 10       # one yield per token
    assert "".join(s[0][0] for s in steps) == final.text
    assert [t for s in steps for t in s[0][1]] == final.token_ids and len(final.token_ids) == 10
    assert [lp for s in steps for lp in s[0][2]] == final.logprobs
    for token, entry in zip(final.token_ids, final.logprobs, strict=True):
        # The top 2 ranked 1 and 2, plus the sampled token (with its own rank) when it is not among them.
        ranked = sorted(entry.items(), key=lambda kv: kv[1].rank)
        assert [lp.rank for _, lp in ranked[:2]] == [1, 2] and ranked[0][1].logprob >= ranked[1][1].logprob
        assert token in entry and len(entry) == (2 if entry[token].rank <= 2 else 3)
    assert final.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(final.token_ids,
                                                                                        final.logprobs,
                                                                                        strict=True)))
    # The caller's SamplingParams was prepared in place and is visible to tests.
    assert params.end_id == llm.tokenizer.eos_token_id and params.pad_id is not None
    assert llm.last_sampling_params[-1] is params
    # A seeded request draws the same tokens again.
    again = llm.generate({"prompt_token_ids": [266, 300, 274]},
                         trt.SamplingParams(max_tokens=10, temperature=0.8, seed=7, ignore_eos=True))
    assert again.outputs[0].token_ids == final.token_ids


def test_n_samples_answer_one_sequence_per_yield(trt, llm):
    """With n > 1 each response carries one sample (sequence_index): only that output's token_ids grow,
    and the others keep their previous token_ids_diff (upstream _handle_sequence)."""
    params = trt.SamplingParams(max_tokens=6, temperature=1.0, seed=1, n=2, ignore_eos=True)

    async def go():
        output = llm.generate_async("numbers", params, streaming=True)
        seen = [0, 0]
        async for step in output:
            grown = [i for i, o in enumerate(step.outputs) if len(o.token_ids) != seen[i]]
            assert len(grown) == 1
            seen = [len(o.token_ids) for o in step.outputs]
        return output
    output = asyncio.run(go())
    assert [len(o.token_ids) for o in output.outputs] == [6, 6]
    assert output.outputs[0].token_ids != output.outputs[1].token_ids


def test_abort_ends_with_cancelled(trt, llm):
    llm.fake_step_delay_s = 0.01

    async def go():
        output = llm.generate_async("go", trt.SamplingParams(max_tokens=200, ignore_eos=True), streaming=True)
        steps = 0
        async for step in output:
            steps += 1
            if steps == 2:
                step.abort()
        return output, steps
    try:
        output, steps = asyncio.run(go())
    finally:
        llm.fake_step_delay_s = 0.0
    assert output.aborted() and output.finished and output.outputs[0].finish_reason == "cancelled"
    assert steps < 50 and len(output.outputs[0].token_ids) < 50


def test_stop_string_truncates_the_text(trt, llm):
    text = greedy_text(trt, llm, "a b c").text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    assert stop.strip()
    out = llm.generate("a b c", trt.SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, stop=stop))
    done = out.outputs[0]
    assert done.finish_reason == "stop" and done.stop_reason == stop and done.text == text[:text.index(stop)]
    kept = llm.generate("a b c", trt.SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, stop=[stop],
                                                    include_stop_str_in_output=True))
    assert kept.outputs[0].text == text[:text.index(stop) + len(stop)]


def test_stop_token_and_end_id(trt, llm):
    ids = greedy_text(trt, llm, "Step 1:", 16).token_ids
    stop = ids[5]
    first = ids.index(stop)
    out = llm.generate("Step 1:", trt.SamplingParams(max_tokens=16, temperature=0.0, stop_token_ids=[stop]))
    done = out.outputs[0]
    # STOP_WORDS: reason is the token id and the stop token is stripped from token_ids.
    assert done.finish_reason == "stop" and done.stop_reason == stop and done.token_ids == ids[:first]
    # END_ID: reason None, and the end token never appears in the output.
    out = llm.generate("Step 1:", trt.SamplingParams(max_tokens=16, temperature=0.0, end_id=stop))
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason is None
    assert out.outputs[0].token_ids == ids[:first]


def test_sampling_params_validation(trt, monkeypatch):
    monkeypatch.delenv("TLLM_ALLOW_N_GREEDY_DECODING", raising=False)
    with pytest.raises(ValueError, match="TLLM_ALLOW_N_GREEDY_DECODING"):
        trt.SamplingParams(n=4)                            # no sampling knobs: greedy
    with pytest.raises(ValueError):
        trt.SamplingParams(n=2, temperature=0.0)
    assert trt.SamplingParams(n=4, temperature=0.7).best_of == 4
    for bad in ({"top_p": 1.5}, {"top_k": -1}, {"min_p": 2.0}, {"temperature": -0.1}, {"logprobs": 101},
                {"n": 3, "best_of": 2, "temperature": 1.0}, {"top_p": float("nan")}):
        with pytest.raises(ValueError):
            trt.SamplingParams(**bad)
    assert trt.SamplingParams(logprobs=True).logprobs == 0
    monkeypatch.setenv("TLLM_ALLOW_N_GREEDY_DECODING", "1")
    assert trt.SamplingParams(n=4).best_of == 4


def test_llm_and_kv_cache_config_refuse_unknown_arguments(trt, tiny_model):
    from tensorrt_llm.llmapi import KvCacheConfig

    with pytest.raises(ValueError, match=r"not supported by the PyTorch backend: \['build_config'\]"):
        trt.LLM(str(tiny_model), build_config=object())
    with pytest.raises(ValueError, match="Unknown backend"):
        trt.LLM(str(tiny_model), backend="tensorrt")
    with pytest.raises(ValueError):
        KvCacheConfig(free_gpu_memory_fraction=1.5)
    with pytest.raises(ValueError):
        KvCacheConfig(max_token=10)
    assert KvCacheConfig().enable_block_reuse and KvCacheConfig().tokens_per_block == 32


def test_iteration_stats(trt, llm):
    while llm.get_stats(timeout=0.1):                      # drain what earlier tests left, to the last step
        pass
    llm.generate("The answer is", trt.SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))
    records = llm.get_stats(timeout=0.2)
    assert len(records) == 5                               # one per iteration: prefill + 4 decode steps
    for r in records:
        assert {"iter", "iterLatencyMS", "numActiveRequests", "numQueuedRequests", "numCompletedRequests",
                "maxNumActiveRequests", "kvCacheStats", "inflightBatchingStats"} <= set(r)
        assert {"maxNumBlocks", "freeNumBlocks", "usedNumBlocks", "tokensPerBlock", "reusedBlocks", "missedBlocks",
                "cacheHitRate"} <= set(r["kvCacheStats"])
        assert {"numScheduledRequests", "numContextRequests", "numGenRequests",
                "numCtxTokens"} <= set(r["inflightBatchingStats"])
    assert records[0]["inflightBatchingStats"]["numContextRequests"] == 1
    assert records[-1]["numCompletedRequests"] == 1 and records[0]["kvCacheStats"]["usedNumBlocks"] > 0
    assert llm.get_stats(timeout=0.05) == []                # drained until new requests arrive

    async def go():
        llm.generate_async("again", trt.SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
        return [r async for r in llm.get_stats_async(timeout=0.3)]
    assert [r["numActiveRequests"] for r in asyncio.run(go())] == [1, 1, 1]


def test_context_logits(trt, llm, tiny_model):
    from transformers import AutoModelForCausalLM

    out = llm.generate([266, 300, 274, 273], trt.SamplingParams(max_tokens=1, temperature=0.0,
                                                                return_context_logits=True))
    logits = out.context_logits
    assert logits.dtype == torch.float32 and logits.shape == (4, len(llm.tokenizer))
    hf = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    with torch.no_grad():
        want = hf(torch.tensor([[266, 300, 274, 273]])).logits[0]
    assert torch.allclose(logits, want, atol=1e-4)
    assert llm.generate([266, 300], trt.SamplingParams(max_tokens=1)).context_logits is None


def test_shutdown(trt, tiny_model):
    from tensorrt_llm.llmapi.llm import live_llms

    llm = trt.LLM(str(tiny_model))
    params = trt.SamplingParams(max_tokens=2)
    assert len(llm.generate(["one", "two"], params)) == 2 and llm in live_llms()
    llm.shutdown()
    assert llm not in live_llms()
    llm.shutdown()                                         # idempotent
    with pytest.raises(RuntimeError, match="LLM is shutting down"):
        llm.generate_async("three", params)
