"""The gateway's mapping of OpenAI requests to runs, in process: the model field and extra_body, sampling
fields, refusals naming the parameter, choices, and errors in OpenAI's shape."""

from __future__ import annotations

import grpc
import pytest

from gateway import openai_request
from gateway import openai_response as shape_of
from gateway.errors import APIError, from_trellis
from gateway.run_plan import plan
from trellis_client import Candidate, Catalog, ControllerInfo, ParamInfo, Result, Timings, TrellisError, Usage

CATALOG = Catalog(
    controllers=[ControllerInfo("native_generation", "", []),
                 ControllerInfo("majority_vote", "", [ParamInfo("n", "int", "", 8),
                                                      ParamInfo("share", "float", "", 0.5),
                                                      ParamInfo("extractor", "str", "", "auto"),
                                                      ParamInfo("early_stop", "bool", "", False)])],
    models=["SmolLM2-135M-Instruct"])
MESSAGES = [{"role": "user", "content": "hi"}]


def refused(call, *args) -> APIError:
    with pytest.raises(APIError) as info:
        call(*args)
    return info.value


def test_model_field_names_controller_params_and_pool():
    run = plan("majority_vote@SmolLM2-135M-Instruct?n=8&share=0.6&extractor=boxed&early_stop=true", None, CATALOG)
    assert (run.controller, run.model) == ("majority_vote", "SmolLM2-135M-Instruct")
    assert run.params == {"n": 8, "share": 0.6, "extractor": "boxed", "early_stop": True}
    assert plan("SmolLM2-135M-Instruct", None, CATALOG).controller == "native_generation"
    assert plan("SmolLM2-135M-Instruct", None, CATALOG).model == "SmolLM2-135M-Instruct"
    bad = refused(plan, "majority_vote?n=eight", None, CATALOG)
    assert (bad.status, bad.param) == (400, "params.n")
    assert refused(plan, "majority_vote?early_stop=maybe", None, CATALOG).param == "params.early_stop"
    assert refused(plan, "", None, CATALOG).param == "model"


def test_extra_body_wins_and_is_checked():
    run = plan("majority_vote?n=3", {"params": {"n": 5}, "priority": 2, "model": "other", "events": False}, CATALOG)
    assert (run.params, run.priority, run.model, run.events) == ({"n": 5}, 2, "other", False)
    switched = plan("majority_vote?n=3", {"controller": "native_generation"}, CATALOG)
    assert (switched.controller, switched.params) == ("native_generation", {})   # n=3 belonged to the vote
    assert refused(plan, "majority_vote", {"bogus": 1}, CATALOG).param == "trellis.bogus"
    assert refused(plan, "majority_vote", {"params": [1]}, CATALOG).param == "trellis.params"
    assert refused(plan, "majority_vote", {"priority": "high"}, CATALOG).param == "trellis.priority"
    assert refused(plan, "majority_vote", "n=3", CATALOG).param == "trellis"
    # a name the caller's catalog does not list goes to the router, which decides (unknown or not allowed)
    assert plan("mcts?iterations=4", None, CATALOG).params == {"iterations": 4}


def test_chat_sampling_mapping_and_refusals():
    body = {"messages": [{"role": "developer", "content": [{"type": "text", "text": "be "},
                                                           {"type": "text", "text": "brief"}]},
                         {"role": "user", "content": "hi"}],
            "temperature": 0.5, "top_p": 0.9, "max_completion_tokens": 40, "max_tokens": 99, "stop": "END",
            "seed": 3, "presence_penalty": 0.1, "top_k": 5, "n": 2, "stream": True,
            "stream_options": {"include_usage": True}, "logprobs": False, "tools": [], "user": "u1"}
    choices = openai_request.chat(body, max_choices=4)
    assert choices.prompts == [[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]]
    assert choices.sampling == {"temperature": 0.5, "top_p": 0.9, "max_tokens": 40, "stop": ["END"], "seed": 3,
                                "presence_penalty": 0.1, "top_k": 5}
    assert (choices.n, choices.stream, choices.include_usage, choices.raw) == (2, True, True, False)
    for field, value in (("tools", [{"type": "function"}]), ("logprobs", True), ("logit_bias", {"1": 2}),
                         ("n", 5), ("n", 0), ("temperature", "hot"), ("top_k", 1.5), ("max_tokens", 0),
                         ("stop", [1]), ("stream", "yes"), ("messages", [])):
        assert refused(openai_request.chat, {"messages": MESSAGES, field: value}, 4).param == field
    assert refused(openai_request.chat, {"messages": MESSAGES, "response_format": {"type": "json_object"}},
                   4).param == "response_format"
    part = refused(openai_request.chat, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 4)
    assert part.param == "messages[0].content[0]"


def test_completions_prompt_forms_and_defaults():
    assert openai_request.completions({"prompt": "a"}, 4).sampling == {"max_tokens": 16}   # OpenAI's default
    assert openai_request.completions({"prompt": ["a", "b"], "n": 2}, 4).prompts == ["a", "b"]
    assert openai_request.completions({"prompt": [1, 2, 3]}, 4).prompts == [[1, 2, 3]]
    assert openai_request.completions({"prompt": [[1], [2, 3]]}, 4).prompts == [[1], [2, 3]]
    assert openai_request.completions({"prompt": "a"}, 4).raw
    assert refused(openai_request.completions, {"prompt": ["a", "b", "c"], "n": 2}, 4).param == "n"
    assert refused(openai_request.completions, {"prompt": "a", "echo": True}, 4).param == "echo"
    assert refused(openai_request.completions, {"prompt": "a", "best_of": 3}, 4).param == "best_of"
    assert refused(openai_request.completions, {"prompt": {"x": 1}}, 4).param == "prompt"


def test_router_errors_become_openai_errors():
    def err(code, message="m", field="", reason="", retry_after=None):
        return TrellisError(code, message, field=field, reason=reason, retry_after=retry_after)

    full = from_trellis(err(grpc.StatusCode.RESOURCE_EXHAUSTED, retry_after=0.25))
    assert (full.status, full.type, full.code) == (429, "rate_limit_error", "rate_limit_exceeded")
    assert full.headers() == {"retry-after": "1", "retry-after-ms": "250"}
    bad = from_trellis(err(grpc.StatusCode.INVALID_ARGUMENT, field="sampling.temperature"))
    assert (bad.status, bad.param) == (400, "temperature")
    assert from_trellis(err(grpc.StatusCode.INVALID_ARGUMENT, field="prompt"), "prompt").param == "prompt"
    long = from_trellis(err(grpc.StatusCode.INVALID_ARGUMENT, field="prompt", reason="CONTEXT_LENGTH_EXCEEDED"))
    assert (long.param, long.code) == ("messages", "context_length_exceeded")
    unknown = from_trellis(err(grpc.StatusCode.INVALID_ARGUMENT, field="controller"), model="gpt-4o")
    assert (unknown.status, unknown.code, unknown.param) == (404, "model_not_found", "model")
    assert from_trellis(err(grpc.StatusCode.UNAUTHENTICATED)).status == 401
    assert from_trellis(err(grpc.StatusCode.PERMISSION_DENIED, field="controller")).status == 403
    assert from_trellis(err(grpc.StatusCode.UNAVAILABLE)).status == 503
    assert from_trellis(err(grpc.StatusCode.DEADLINE_EXCEEDED)).status == 504
    assert from_trellis(err(grpc.StatusCode.INTERNAL)).status == 500
    assert set(bad.body()["error"]) == {"message", "type", "param", "code"}


def result(text: str, finish: str = "stop", n: int = 1) -> Result:
    return Result("r1", "majority_vote", "7", text, [Candidate(f"sample/{i}", text if i == 0 else "x", "7", 0.0,
                                                               finish) for i in range(n)],
                  {"votes": {"7": 2}}, Usage(10, 30, 4, 3), Timings(1.0, 2.0, 3.0))


def test_response_shapes():
    chat = shape_of.Shape(True, "chatcmpl-1", 5, "majority_vote?n=3")
    body = shape_of.response(chat, [result("It is 7.", "length", 3), result("7")])
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "It is 7.", "refusal": None}
    assert body["choices"][0]["finish_reason"] == "length" and body["choices"][1]["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 20, "completion_tokens": 60, "total_tokens": 80,
                             "prompt_tokens_details": {"cached_tokens": 8}}
    assert body["choices"][0]["trellis"]["details"] == {"votes": {"7": 2}}
    text = shape_of.Shape(False, "cmpl-1", 5, "m")
    assert shape_of.response(text, [result("7")])["choices"][0]["text"] == "7"
    assert shape_of.chunk(chat, 0, "a")["choices"][0]["delta"] == {"content": "a"}
    assert shape_of.chunk(chat, 0, "", role=True)["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert shape_of.usage_chunk(chat, [result("7")])["choices"] == []
