"""The end of a sequence's text (issue 21): a sequence cut inside a UTF-8 character (length, stop token, stop
string, cancel) does not end in U+FFFD, streamed deltas add up to the final text, and a U+FFFD the model really
produced stays. Every worker kind: the torch engine's detokenizer, in process and through worker + router
processes, the TensorRT-LLM adapter, the OpenAI-compatible worker, and the stop-string matcher they share.

The tiny random model answers every prompt with one token over and over, so the tests that generate use a
*scripted* model instead: the tiny tokenizer, and weights made so that greedy decoding follows fixed chains of
tokens (each chain token has an embedding of its own, the layers add nothing, the LM head maps each embedding to
the next token of its chain). Its chains cut characters wherever a test asks, deterministically.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from torch_engine.detokenizer import IncrementalDetokenizer
from trellis_rpc.sampling import SamplingConfig
from worker_runtime.engine_api import Delta, Finished, PromptInput
from worker_runtime.stop_strings import StopStringMatcher
from worker_runtime.text_end import incomplete_tail, token_bytes, trim_cut_character

FAKES = Path(__file__).parent / "fakes"
FFFD = "\ufffd"

CYCLE_TEXT = "emoji 🙂 日本語のテ Ελλ!"   # emoji and CJK split over byte-level tokens, one token mixing two characters
STOP_TEXT = "x", "STOP", " y"             # after "x": the first half of an emoji, then the stop string
REAL_TEXT = "ok" + FFFD + "?"             # U+FFFD the model writes (bytes EF BF BD over three tokens)


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def detokenize(tokenizer, ids: list[int]) -> list[str]:
    """Every piece an IncrementalDetokenizer gives for ids, then its flush (the end of the sequence)."""
    detok = IncrementalDetokenizer(tokenizer)
    return [detok.push(t) for t in ids] + [detok.flush()]


def whole_characters(tokenizer, text: str, ids: list[int]) -> str:
    """What a sequence of the first tokens of `text` must read: the characters whose bytes they hold in full
    (a byte-level token is spelt with one character per byte)."""
    count = sum(len(t) for t in tokenizer.convert_ids_to_tokens(ids))
    return text.encode()[:count].decode("utf-8", "ignore")


# ---- the detokenizer, with the tiny model's byte-level BPE ---------------------------------------------------

@pytest.mark.parametrize("text", [CYCLE_TEXT, "日本語のテキスト 🙂🚀", "naïve café, Ελληνικά, русский текст 🙂"])
def test_a_sequence_cut_anywhere_ends_without_a_replacement_character(tokenizer, text):
    ids = ids_of(tokenizer, text)
    cut_inside = 0
    for k in range(1, len(ids) + 1):
        pieces = detokenize(tokenizer, ids[:k])
        assert not any(FFFD in p for p in pieces), (k, pieces)
        assert "".join(pieces) == whole_characters(tokenizer, text, ids[:k])
        cut_inside += tokenizer.decode(ids[:k]).endswith(FFFD)
    assert cut_inside >= 3, "the text must really be cut inside characters"


def test_a_special_token_after_a_cut_character_changes_nothing(tokenizer):
    ids = ids_of(tokenizer, "emoji 🙂")[:-1] + [tokenizer.convert_tokens_to_ids("<|im_start|>")]
    assert "".join(detokenize(tokenizer, ids)) == "emoji "


def test_a_replacement_character_the_model_wrote_is_kept(tokenizer):
    ids = ids_of(tokenizer, REAL_TEXT)
    assert "".join(detokenize(tokenizer, ids)) == REAL_TEXT                      # mid-text
    assert "".join(detokenize(tokenizer, ids[:-1])) == "ok" + FFFD               # its bytes EF BF BD end the text
    assert "".join(detokenize(tokenizer, ids[:-2])) == "ok"                      # EF BF: cut


def test_invalid_bytes_mid_text_stay_and_only_the_cut_goes(tokenizer):
    lead = tokenizer.convert_tokens_to_ids("ðŁ")                                 # F0 9F: half an emoji
    ids = ids_of(tokenizer, "a") + [lead] + ids_of(tokenizer, "b") + [lead]
    assert "".join(detokenize(tokenizer, ids)) == "a" + FFFD + "b"
    assert "".join(detokenize(tokenizer, [lead, lead, lead])) == FFFD * 2       # two invalid, the last one cut


# ---- a byte-fallback tokenizer (Llama 2, Mistral: bytes as <0xNN> tokens) -------------------------------------

@pytest.fixture(scope="module")
def byte_fallback_tokenizer():
    from tokenizers import Tokenizer, decoders, models, normalizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)},
             "\u2581": 259, "a": 260, "\u2581a": 261, "b": 262}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("\u2581", "a")], unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def test_byte_fallback_tokens_are_read_as_bytes(byte_fallback_tokenizer):
    tok = byte_fallback_tokenizer
    text = "a日🙂 b a"
    ids = ids_of(tok, text)
    assert token_bytes(tok, ids) == (" " + text).encode()       # the Metaspace prefix is a byte like any other
    for k in range(1, len(ids) + 1):
        pieces = detokenize(tok, ids[:k])
        assert not any(FFFD in p for p in pieces), (k, pieces)
        clean = max(j for j in range(k + 1) if FFFD not in tok.decode(ids[:j]))
        assert "".join(pieces) == tok.decode(ids[:clean])


def test_trimming_rules():
    assert trim_cut_character("abc" + FFFD * 2) == "abc"            # no bytes known: the whole trailing run
    assert trim_cut_character("a" + FFFD + "b") == "a" + FFFD + "b"  # not at the end
    assert incomplete_tail("🙂".encode()[:3]) == 3 and incomplete_tail(b"\xf0\x80") == 0
    assert incomplete_tail(FFFD.encode()) == 0


# ---- the stop-string matcher ---------------------------------------------------------------------------------

def feed_all(matcher: StopStringMatcher, pieces: list[str], end=None) -> list[str]:
    out = []
    for piece in pieces:
        out.append(matcher.feed(piece))
        if matcher.matched:
            return out
    return [*out, matcher.flush(end)]


def test_a_replacement_run_is_held_back_until_text_follows():
    m = StopStringMatcher(())
    assert m.feed("a" + FFFD) == "a"
    assert m.feed(FFFD) == ""
    assert m.feed("b") == FFFD * 2 + "b"                            # followed by text: the model wrote it
    m = StopStringMatcher(("STOP",))
    out = feed_all(m, ["x", FFFD + "S", "TOP"])
    assert "".join(out) == m.text == "x" and m.matched == "STOP"    # right before the stop: cut


def test_held_back_replacements_end_the_text_as_the_end_decides():
    m = StopStringMatcher(("END",))
    out = feed_all(m, ["x" + FFFD, "E"], end=trim_cut_character)
    assert "".join(out) == m.text == "x" + FFFD + "E"               # held with a stop's start, then text after all
    m = StopStringMatcher(("END",))
    out = feed_all(m, ["x" + FFFD, FFFD], end=trim_cut_character)
    assert "".join(out) == m.text == "x"
    m = StopStringMatcher(())
    out = feed_all(m, ["x" + FFFD])
    assert "".join(out) == m.text == "x" + FFFD                     # no end given: released as it is


def test_a_partial_character_before_a_stop_string_is_not_text(tokenizer):
    lead = tokenizer.convert_tokens_to_ids("ðŁ")
    ids = ids_of(tokenizer, "x") + [lead] + ids_of(tokenizer, "STOP tail")
    detok, m = IncrementalDetokenizer(tokenizer), StopStringMatcher(("STOP",))
    streamed = ""
    for t in ids:
        streamed += m.feed(detok.push(t))
        if m.matched:
            break
    assert m.matched == "STOP" and streamed == m.text == "x"


# ---- the scripted model ----------------------------------------------------------------------------------------

@dataclass
class Script:
    path: Path
    cycle: list[int]          # after the prompt "Q": CYCLE_TEXT's tokens, round and round
    stop_chain: list[int]     # after "#": STOP_TEXT's tokens with half an emoji after "x", then the end of sequence
    real_chain: list[int]     # after "%": REAL_TEXT's tokens, then the end of sequence


def build_scripted_model(target: Path, tokenizer, chains: dict[int | None, int], scale: float = 10.0) -> Path:
    """Greedy decoding maps each token in `chains` to its successor, every other token to chains[None]."""
    hidden = 64
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    assert len(chains) < hidden
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.model.layers.parameters():
            if p.dim() == 2:
                p.zero_()                      # attention and MLP add nothing: the last token alone decides
        embed, head = model.model.embed_tokens.weight, model.lm_head.weight
        embed.zero_()
        head.zero_()
        embed[:, hidden - 1] = 1.0
        for dim, (token, successor) in enumerate(chains.items()):
            if token is None:
                dim = hidden - 1
            else:
                embed[token] = 0.0
                embed[token, dim] = 1.0
            head[successor, dim] = scale
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


@pytest.fixture(scope="module")
def script(tokenizer, tmp_path_factory) -> Script:
    lead = tokenizer.convert_tokens_to_ids("ðŁ")
    cycle = ids_of(tokenizer, CYCLE_TEXT)
    stop_chain = ids_of(tokenizer, STOP_TEXT[0]) + [lead] + ids_of(tokenizer, STOP_TEXT[1] + STOP_TEXT[2])
    real_chain = ids_of(tokenizer, REAL_TEXT)
    starts = {ids_of(tokenizer, "#")[-1]: stop_chain, ids_of(tokenizer, "%")[-1]: real_chain}
    used = [*cycle, *stop_chain, *real_chain, *starts]
    assert len(set(used)) == len(used), "every scripted token needs a successor of its own"
    chains: dict[int | None, int] = {None: cycle[0], **dict(zip(cycle, cycle[1:] + cycle[:1], strict=True))}
    for start, chain in starts.items():
        chains.update(zip([start, *chain], [*chain, tokenizer.eos_token_id], strict=True))
    path = build_scripted_model(tmp_path_factory.mktemp("scripted"), tokenizer, chains)
    return Script(path, cycle, stop_chain, real_chain)


def test_the_scripted_model_follows_its_chains(script, tokenizer):
    model = LlamaForCausalLM.from_pretrained(script.path)
    for prompt, chain in (("Q", script.cycle * 2), ("#", script.stop_chain), ("%", script.real_chain)):
        ids = ids_of(tokenizer, prompt)
        out = model.generate(torch.tensor([ids]), max_new_tokens=len(chain), do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)[0, len(ids):].tolist()
        assert out == chain


# ---- the torch engine, in process ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine(script):
    from torch_engine.engine import TorchEngine
    from torch_engine.model_loader import load_model

    engine = TorchEngine(load_model(str(script.path)), threads=1)   # its loop runs on a thread of its own
    yield engine
    engine.close()


def generate(engine, prompt: PromptInput, cfg: SamplingConfig) -> tuple[list[Delta], Finished]:
    async def go():
        deltas, done = [], None
        async for event in engine.generate(f"t{next(_task_ids)}", prompt, cfg):
            if isinstance(event, Delta):
                deltas.append(event)
            else:
                done = event
        return deltas, done
    return asyncio.run(go())


_task_ids = iter(range(10**9))


def check_sample(deltas: list[Delta], done: Finished, text: str, finish: str) -> None:
    c = done.completions[0]
    assert "".join(d.text for d in deltas) == c.text == text, (c.text, text)
    assert c.finish_reason == finish and deltas[-1].finish_reason == finish


def test_the_engine_cut_at_every_length(engine, script, tokenizer):
    for k in range(1, len(script.cycle) + 2):
        deltas, done = generate(engine, PromptInput(text="Q"), SamplingConfig(temperature=0.0, max_tokens=k))
        expected = whole_characters(tokenizer, CYCLE_TEXT * 2, (script.cycle * 2)[:k])
        check_sample(deltas, done, expected, "length")
        assert done.completions[0].token_ids == (script.cycle * 2)[:k]      # the ids keep the cut bytes


def test_a_continued_sequence_completes_the_character_its_source_cut(engine, script, tokenizer):
    """A task cut inside the emoji keeps its sequence; a continuation (no text appended) starts from its end, so
    the first task's text and the continuation's add up to the whole text, with no U+FFFD at the seam."""
    from worker_runtime.engine_api import SequenceSource

    chain = script.cycle * 2
    for k in range(1, len(script.cycle)):
        async def go(k=k):
            first = second = None
            async for event in engine.generate(f"keep{k}", PromptInput(text="Q"), SamplingConfig(
                    temperature=0.0, max_tokens=k), keep_ttl_s=30.0):
                first = event if isinstance(event, Finished) else first
            async for event in engine.generate(f"cont{k}", PromptInput(text=""), SamplingConfig(
                    temperature=0.0, max_tokens=4), source=SequenceSource(first.handles[0])):
                second = event if isinstance(event, Finished) else second
            return first.completions[0], second.completions[0]
        first, second = asyncio.run(go())
        assert second.token_ids == chain[k:k + 4]
        joined = first.text + second.text
        assert joined == whole_characters(tokenizer, CYCLE_TEXT * 2, chain[:k + 4]) and FFFD not in joined, (k, joined)


def test_the_engine_at_a_stop_token_and_a_stop_string(engine, script):
    # A stop token right after the first half of the emoji: the half goes (its token ids stay).
    cfg = SamplingConfig(temperature=0.0, max_tokens=40, stop_token_ids=(script.cycle[4],))
    deltas, done = generate(engine, PromptInput(text="Q"), cfg)
    check_sample(deltas, done, "emoji ", "stop")
    # The stop string follows half an emoji: the text ends before both.
    deltas, done = generate(engine, PromptInput(text="#"), SamplingConfig(temperature=0.0, max_tokens=40,
                                                                          stop=("STOP",)))
    check_sample(deltas, done, "x", "stop")
    assert done.completions[0].stop_reason == "STOP"


def test_the_engine_keeps_a_replacement_character_the_model_wrote(engine, script):
    for k, text in ((len(script.real_chain) - 1, "ok" + FFFD), (len(script.real_chain), REAL_TEXT),
                    (len(script.real_chain) - 2, "ok")):
        deltas, done = generate(engine, PromptInput(text="%"), SamplingConfig(temperature=0.0, max_tokens=k))
        check_sample(deltas, done, text, "length")


# ---- through worker and router processes, with the client library --------------------------------------------

@pytest.fixture(scope="module")
def scripted_router(script, logs):
    from client.launcher import start_router, start_worker

    worker = start_worker(str(script.path), logs, name="text-end-worker",
                          extra=["--threads", "1", "--dtype", "float32"])
    router = None
    try:
        worker.wait_serving(timeout=120)
        router = start_router([worker.address], logs, name="text-end-router")
        router.wait_serving(timeout=60)
        yield router
    finally:
        for proc in (router, worker):
            if proc is not None:
                proc.stop()


def stream_run(client, prompt: str, sampling: dict) -> tuple[str, str]:
    """native_generation's streamed deltas, concatenated, and its result's text."""
    from trellis_client.types import Delta as ClientDelta
    from trellis_client.types import Final

    streamed, result = "", None
    for event in client.stream("native_generation", prompt, raw=True, sampling=sampling):
        if isinstance(event, ClientDelta):
            streamed += event.text
        elif isinstance(event, Final):
            result = event.result
    return streamed, result.text


@pytest.mark.processes
def test_native_generation_cut_inside_characters_through_the_router(scripted_router, script, tokenizer):
    from trellis_client import Client

    with Client(scripted_router.address) as client:
        for k in range(1, len(script.cycle) + 1):
            streamed, text = stream_run(client, "Q", {"temperature": 0.0, "max_tokens": k})
            assert streamed == text == whole_characters(tokenizer, CYCLE_TEXT, script.cycle[:k]), k
            assert FFFD not in text
        streamed, text = stream_run(client, "Q", {"temperature": 0.0, "max_tokens": 40,
                                                  "stop_token_ids": [script.cycle[4]]})
        assert streamed == text == "emoji "
        streamed, text = stream_run(client, "#", {"temperature": 0.0, "max_tokens": 40, "stop": ["STOP"]})
        assert streamed == text == "x"
        streamed, text = stream_run(client, "%", {"temperature": 0.0, "max_tokens": len(script.real_chain) - 1})
        assert streamed == text == "ok" + FFFD


# ---- the TensorRT-LLM adapter ------------------------------------------------------------------------------------

@dataclass
class FakeCompletion:
    """What the adapter reads of a TensorRT-LLM CompletionOutput (cumulative token_ids and text)."""
    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    index: int = 0
    logprobs: list = None
    cumulative_logprob: float | None = None

    def __post_init__(self):
        self.logprobs = self.logprobs or []


def trt_sample(tokenizer, cfg: SamplingConfig):
    from worker_gpu.trtllm_engine import _Sample

    return _Sample(cfg, lambda t: tokenizer.decode([t]), tokenizer)


def trt_stream(sample, steps: list[FakeCompletion]) -> list[Delta]:
    return [d for step in steps if (d := sample.delta(step)) is not None]


def test_trtllm_text_flushed_with_a_cut_character_ends_before_it(tokenizer):
    ids = ids_of(tokenizer, "emoji 🙂")[:-1]                   # TensorRT-LLM's own detokenizer flushes F0 9F 99
    sample = trt_sample(tokenizer, SamplingConfig(temperature=0.0, max_tokens=len(ids)))
    steps = [FakeCompletion(ids[:k], tokenizer.decode(ids[:k])) for k in range(1, len(ids))]
    steps.append(FakeCompletion(ids, tokenizer.decode(ids), "length"))
    assert steps[-1].text.endswith(FFFD)
    deltas = trt_stream(sample, steps)
    out = sample.completion(0)
    assert "".join(d.text for d in deltas) == out.text == "emoji " and out.token_ids == ids
    assert deltas[-1].finish_reason == "length"


def test_trtllm_keeps_a_replacement_character_the_model_wrote(tokenizer):
    ids = ids_of(tokenizer, "ok" + FFFD)
    sample = trt_sample(tokenizer, SamplingConfig(temperature=0.0, max_tokens=len(ids)))
    deltas = trt_stream(sample, [FakeCompletion(ids[:2], "ok"), FakeCompletion(ids, "ok" + FFFD, "length")])
    assert "".join(d.text for d in deltas) == sample.completion(0).text == "ok" + FFFD


def test_trtllm_cut_at_a_stop_string_right_after_a_cut_character(tokenizer):
    lead = tokenizer.convert_tokens_to_ids("ðŁ")
    ids = ids_of(tokenizer, "x") + [lead] + ids_of(tokenizer, "ST")
    sample = trt_sample(tokenizer, SamplingConfig(temperature=0.0, max_tokens=20, stop=("STOP",)))
    steps = [FakeCompletion(ids[:1], "x"), FakeCompletion(ids[:2], "x" + FFFD),
             FakeCompletion(ids, "x" + FFFD, "stop", "STOP")]   # TensorRT-LLM cut "STOP" off its text first
    deltas = trt_stream(sample, steps)
    assert "".join(d.text for d in deltas) == sample.completion(0).text == "x"
    assert sample.completion(0).stop_reason == "STOP"


@pytest.fixture(scope="module")
def trtllm_engine(script):
    """The adapter over the TensorRT-LLM test double, on the scripted model."""
    sys.path.insert(0, str(FAKES))
    os.environ.setdefault("TLLM_ALLOW_N_GREEDY_DECODING", "1")
    try:
        from worker_gpu.cli import parse_args
        from worker_gpu.trtllm_engine import build_trtllm

        engine, _ = build_trtllm(parse_args(["--model", str(script.path), "--max-batch-size", "4", "--no-verifier"]))
        yield engine
        engine.close()
    finally:
        sys.path.remove(str(FAKES))
        for name in [m for m in sys.modules if m == "tensorrt_llm" or m.startswith("tensorrt_llm.")]:
            del sys.modules[name]


def flushing_decode(self, token_ids, prev_text=None, states=None, *, flush=False, skip_special_tokens=False,
                    **kwargs):
    """TensorRT-LLM's own incremental detokenizer (TLLM_INCREMENTAL_DETOKENIZATION_BACKEND=TRTLLM): pending tokens
    wait while their text ends in U+FFFD, and at the flush come out as they are."""
    pending = (states or {}).get("pending", []) + list(token_ids)
    text = self.tokenizer.decode(pending, skip_special_tokens=skip_special_tokens)
    if not flush and text.endswith(FFFD):
        return prev_text or "", {"pending": pending}
    return (prev_text or "") + text, {"pending": []}


def test_trtllm_engine_cut_at_every_length(trtllm_engine, script, tokenizer, monkeypatch):
    from tensorrt_llm.tokenizer.tokenizer import TransformersTokenizer

    monkeypatch.setattr(TransformersTokenizer, "decode_incrementally", flushing_decode)
    flushed_a_cut = 0
    for k in range(1, len(script.cycle) + 1):
        deltas, done = generate(trtllm_engine, PromptInput(text="Q"), SamplingConfig(temperature=0.0, max_tokens=k))
        check_sample(deltas, done, whole_characters(tokenizer, CYCLE_TEXT, script.cycle[:k]), "length")
        flushed_a_cut += tokenizer.decode(script.cycle[:k]).endswith(FFFD)
    assert flushed_a_cut >= 3


# ---- the OpenAI-compatible worker ------------------------------------------------------------------------------

def openai_engine(chunks: list[dict]):
    """worker_openai's engine over an upstream that streams `chunks` (then [DONE]) to every request."""
    from worker_openai.engine import OpenAIEngine
    from worker_openai.sampling_fields import KINDS
    from worker_openai.upstream import Upstream, UpstreamConfig

    body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
    upstream = Upstream(UpstreamConfig(base_url="http://upstream.test/v1"))
    upstream.client = httpx.AsyncClient(
        base_url="http://upstream.test/v1/", transport=httpx.MockTransport(
            lambda request: httpx.Response(200, content=body.encode(), headers={"content-type": "text/event-stream"})))
    return OpenAIEngine(upstream, KINDS["vllm"], "m")


def chunk(text: str, finish: str | None = None) -> dict:
    return {"choices": [{"index": 0, "text": text, "finish_reason": finish}]}


@pytest.mark.parametrize(("chunks", "text", "finish"), [
    # vLLM-like: the last delta flushes the cut character, the finish reason comes after it or with it
    ([chunk("emoji "), chunk(FFFD), chunk("", "length")], "emoji ", "length"),
    ([chunk("emoji "), chunk("日" + FFFD + FFFD, "length")], "emoji 日", "length"),
    ([chunk("emoji "), chunk(FFFD, "stop")], "emoji ", "stop"),
    # followed by more text: the model wrote it, it stays
    ([chunk("a" + FFFD), chunk("b", "length")], "a" + FFFD + "b", "length"),
    # a stop string right after it: the text ends before both
    ([chunk("x" + FFFD), chunk("STOP and more")], "x", "stop"),
])
def test_openai_worker_ends_a_sequence_without_a_cut_character(chunks, text, finish):
    engine = openai_engine(chunks)
    deltas, done = generate(engine, PromptInput(text="Q"), SamplingConfig(temperature=0.0, max_tokens=8,
                                                                          stop=("STOP",)))
    check_sample(deltas, done, text, finish)
