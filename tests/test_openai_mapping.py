"""worker_openai's mappings, field by field, in-process: sampling fields per upstream kind (sent, sent as the
kind's extension, or refused naming the field), stream chunks of both APIs, HTTP statuses, prompts and kept
sequences. The servers' formats are those of their OpenAI-compatible APIs (vLLM's protocol.py and
serving_completion.py for the vendor fields; OpenAI's API reference for the rest)."""

from __future__ import annotations

import time

import grpc
import pytest

from trellis_rpc.errors import StatusError
from trellis_rpc.sampling import SamplingConfig
from worker_openai.chunks import UNKNOWN_TOKEN_ID, parse_choice
from worker_openai.prompts import KeptPrompts, UpstreamPrompt, appended_text, render
from worker_openai.sampling_fields import KINDS, sampling_fields
from worker_openai.scoring import yes_probability
from worker_openai.upstream import status_error
from worker_runtime.engine_api import PromptInput

# Every Trellis field away from its default, and the value the upstream should get.
ASKED = {"top_k": (5, 5), "min_p": (0.1, 0.1), "min_tokens": (3, 3), "stop_token_ids": ((7, 9), [7, 9]),
         "repetition_penalty": (1.3, 1.3), "ignore_eos": (True, True)}


def refusal(kind: str, **fields) -> StatusError:
    with pytest.raises(StatusError) as err:
        sampling_fields(KINDS[kind], SamplingConfig(**fields), None)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    return err.value


def test_openai_fields_are_sent_as_openai_names_them():
    cfg = SamplingConfig(temperature=0.7, top_p=0.9, max_tokens=33, stop=("\n\n", "END"),
                         frequency_penalty=0.5, presence_penalty=-0.25)
    for kind in ("vllm", "sglang", "trtllm", "llamacpp", "openai"):
        body = sampling_fields(KINDS[kind], cfg, 42)
        assert body == {"max_tokens": 33, "temperature": 0.7, "top_p": 0.9, "stop": ["\n\n", "END"], "seed": 42,
                        "frequency_penalty": 0.5, "presence_penalty": -0.25}, kind


@pytest.mark.parametrize("kind", ["vllm", "sglang", "trtllm"])
def test_vllm_like_servers_get_every_extension_by_its_name(kind):
    cfg = SamplingConfig(**{k: v for k, (v, _) in ASKED.items()})
    body = sampling_fields(KINDS[kind], cfg, None)
    for field, (_, sent) in ASKED.items():
        assert body[field] == sent, field


def test_llamacpp_gets_its_own_names_and_refuses_what_it_lacks():
    body = sampling_fields(KINDS["llamacpp"], SamplingConfig(top_k=40, min_p=0.05, repetition_penalty=1.1), None)
    assert body["top_k"] == 40 and body["min_p"] == 0.05 and body["repeat_penalty"] == 1.1
    assert "repetition_penalty" not in body
    for field in ("min_tokens", "stop_token_ids", "ignore_eos"):
        assert refusal("llamacpp", **{field: ASKED[field][0]}).field == f"sampling.{field}"


@pytest.mark.parametrize("field", sorted(ASKED))
def test_a_hosted_openai_endpoint_refuses_every_extension_by_name(field):
    err = refusal("openai", **{field: ASKED[field][0]})
    assert err.field == f"sampling.{field}" and "(openai)" in err.message


def test_openai_limits_logprobs_and_stop_strings():
    assert refusal("openai", logprobs=6).field == "sampling.logprobs"
    assert refusal("openai", stop=("a", "b", "c", "d", "e")).field == "sampling.stop"
    sampling_fields(KINDS["openai"], SamplingConfig(logprobs=5, stop=("a", "b", "c", "d")), None)


@pytest.mark.parametrize("field, value", [("logprobs", 1), ("presence_penalty", 0.2), ("frequency_penalty", 0.2),
                                          ("top_k", 3), ("min_p", 0.2)])
def test_transformers_serve_refuses_what_it_ignores(field, value):
    assert refusal("transformers", **{field: value}).field == f"sampling.{field}"


def test_transformers_serve_gets_no_stop_field_the_worker_matches_stops_itself():
    assert "stop" not in sampling_fields(KINDS["transformers"], SamplingConfig(stop=("x",)), None)


def test_fields_at_their_defaults_ask_for_nothing_and_are_never_refused():
    for kind in KINDS.values():
        body = sampling_fields(kind, SamplingConfig(), None)
        assert set(body) == {"max_tokens", "temperature", "top_p"}, kind.name


# ---- stream chunks -----------------------------------------------------------------------------------------

def test_a_completions_chunk_with_vllm_token_ids_and_top_logprobs():
    choice = {"index": 0, "text": " four", "finish_reason": None,
              "logprobs": {"tokens": ["token_id:3040"], "token_logprobs": [-0.25], "text_offset": [0],
                           "top_logprobs": [{"token_id:3040": -0.25, "token_id:1234": -1.5}]}}
    piece = parse_choice(choice, None)
    assert piece.text == " four" and piece.token_ids == [3040] and not piece.finish_reason
    assert piece.logprobs[0].logprob == -0.25
    assert [(t.token_id, t.logprob) for t in piece.logprobs[0].top] == [(3040, -0.25), (1234, -1.5)]


def test_a_chat_chunk_with_logprobs_and_a_finish_reason():
    choice = {"index": 0, "delta": {"content": "Yes"}, "finish_reason": "length",
              "logprobs": {"content": [{"token": "Yes", "logprob": -0.1, "bytes": [89, 101, 115],
                                        "top_logprobs": [{"token": "Yes", "logprob": -0.1},
                                                         {"token": "No", "logprob": -2.4}]}]}}
    piece = parse_choice(choice, None)
    assert piece.text == "Yes" and piece.finish_reason == "length"
    assert piece.token_ids == [UNKNOWN_TOKEN_ID]   # no tokenizer, no ids from the upstream: counted, not named
    assert [t.token for t in piece.logprobs[0].top] == ["Yes", "No"]


@pytest.mark.parametrize("upstream, ours", [("stop", "stop"), ("length", "length"), ("abort", "cancelled"),
                                            ("content_filter", "stop"), ("eos", "stop")])
def test_finish_reasons_map(upstream, ours):
    assert parse_choice({"text": "", "finish_reason": upstream}, None).finish_reason == ours


def test_vllm_stop_reason_names_the_stop_string():
    piece = parse_choice({"text": "", "finish_reason": "stop", "stop_reason": "\n\n"}, None)
    assert piece.stop_reason == "\n\n"
    assert parse_choice({"text": "", "finish_reason": "stop", "stop_reason": 128001}, None).stop_reason == ""


# ---- HTTP statuses -> gRPC codes ---------------------------------------------------------------------------

@pytest.mark.parametrize("status, code", [(429, grpc.StatusCode.RESOURCE_EXHAUSTED), (500, grpc.StatusCode.UNAVAILABLE),
                                          (503, grpc.StatusCode.UNAVAILABLE), (400, grpc.StatusCode.INVALID_ARGUMENT),
                                          (422, grpc.StatusCode.INVALID_ARGUMENT),
                                          (401, grpc.StatusCode.UNAUTHENTICATED),
                                          (403, grpc.StatusCode.PERMISSION_DENIED)])
def test_statuses_map_to_codes_with_the_upstreams_message(status, code):
    err = status_error(status, '{"error": {"message": "This model\'s maximum context length is 2048 tokens"}}', "3")
    assert err.code == code and "maximum context length is 2048" in err.message
    assert ("retry after 3 s" in err.message) == (status == 429)


def test_fastapi_detail_and_plain_text_messages():
    assert "prompt must be a string" in status_error(400, '{"detail": "prompt must be a string."}').message
    assert "Bad Gateway" in status_error(502, "Bad Gateway").message


# ---- prompts and kept sequences ----------------------------------------------------------------------------

def test_without_a_tokenizer_a_chat_goes_to_chat_completions_and_continues_its_final_message():
    prompt = render(PromptInput(chat=[{"role": "user", "content": "Hi"}]))
    assert prompt.chat and prompt.body() == {"messages": [{"role": "user", "content": "Hi"}]}
    more = prompt.extended("Hello").extended(" there")
    assert more.continue_final and more.messages[-1] == {"role": "assistant", "content": "Hello there"}


def test_text_and_token_prompts_go_to_completions():
    assert render(PromptInput(text="abc")).extended("def").body() == {"prompt": "abcdef"}
    assert render(PromptInput(token_ids=[1, 2, 3])).body() == {"prompt": [1, 2, 3]}
    with pytest.raises(StatusError) as err:
        render(PromptInput(token_ids=[1, 2])).extended("x")
    assert err.value.field == "prompt.token_ids"


def test_a_continuation_appends_text_only():
    assert appended_text(PromptInput(text=" probe")) == " probe"
    with pytest.raises(StatusError) as err:
        appended_text(PromptInput(chat=[{"role": "user", "content": "x"}]))
    assert err.value.field == "prompt.chat"


def test_kept_prompts_fork_continue_expire_and_release():
    kept = KeptPrompts(capacity=3)
    kept.keep("run1/t1/0", UpstreamPrompt(text="a"), ttl_s=60)
    kept.keep("run1/t1/1", UpstreamPrompt(text="b"), ttl_s=0.01)
    kept.keep("run2/t1/0", UpstreamPrompt(text="c"), ttl_s=60)
    assert kept.get("run1/t1/0").text == "a"
    kept.use_up("run1/t1/0")                                   # a continuation took it over
    with pytest.raises(StatusError) as err:
        kept.get("run1/t1/0")
    assert err.value.code == grpc.StatusCode.NOT_FOUND and err.value.field == "generate.source"
    time.sleep(0.02)
    with pytest.raises(StatusError):
        kept.get("run1/t1/1")                                  # expired
    kept.release("run2")
    assert len(kept) == 0
    for i in range(5):
        kept.keep(f"r/{i}", UpstreamPrompt(text=str(i)), ttl_s=60)
    assert len(kept) == 3 and kept.get("r/4").text == "4"   # the oldest went first


def test_yes_probability_from_top_logprobs():
    import math

    assert yes_probability({"Yes": math.log(0.6), " yes": math.log(0.2), "No": math.log(0.2)}) == pytest.approx(0.8)
    assert yes_probability({"Maybe": -0.1}) == 0.5
