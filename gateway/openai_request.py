"""OpenAI request bodies (chat completions and completions) into what a Trellis run takes.

OpenAI's sampling fields map onto the contract's SamplingParams; vLLM's common extensions (top_k, min_p,
repetition_penalty, min_tokens, ignore_eos, stop_token_ids) are taken too. Fields that would change what the
caller gets back and that Trellis does not do (tools, JSON mode, logit_bias, logprobs, echo, suffix, best_of)
are refused with a 400 naming them rather than ignored. `n` keeps OpenAI's meaning: n independent choices,
each a whole run of the controller.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.errors import bad_request

_NUMBER_FIELDS = {"temperature": float, "top_p": float, "frequency_penalty": float, "presence_penalty": float,
                  "min_p": float, "repetition_penalty": float, "top_k": int, "seed": int, "min_tokens": int}
_REFUSED_CHAT = {"tools": "tool calling", "functions": "function calling", "tool_choice": "tool calling",
                 "function_call": "function calling", "logit_bias": "logit_bias", "logprobs": "logprobs",
                 "top_logprobs": "logprobs", "audio": "audio output", "prediction": "predicted outputs"}
_REFUSED_COMPLETIONS = {"logit_bias": "logit_bias", "logprobs": "logprobs", "echo": "echo", "suffix": "suffix"}


@dataclass
class Choices:
    """What to run: one prompt per entry (completions may send several), each run n times."""
    prompts: list[Any]                 # str (chat: a message list) or a list of token ids
    raw: bool                          # completions: the text as is; chat: the model's chat template
    sampling: dict[str, Any] = field(default_factory=dict)
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    prompt_param: str = "messages"     # how the caller named the prompt, for error messages


def _set(value: Any) -> bool:
    """OpenAI clients send unused fields as null, false, 0 or empty; only a real value counts as asked for."""
    return value not in (None, False, [], {}, "", 0)


def _refuse(body: Mapping[str, Any], refused: Mapping[str, str]) -> None:
    for name, what in refused.items():
        if _set(body.get(name)):
            raise bad_request(name, f"{what} is not supported by this gateway (Trellis runs return text)")


def _int(body: Mapping[str, Any], name: str, minimum: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise bad_request(name, f"must be an integer >= {minimum}, got {value!r}")
    return value


def _sampling(body: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, kind in _NUMBER_FIELDS.items():
        value = body.get(name)
        if value is None:
            continue
        whole = isinstance(value, int | float) and float(value).is_integer()
        if isinstance(value, bool) or not isinstance(value, int | float) or (kind is int and not whole):
            raise bad_request(name, f"must be {'an integer' if kind is int else 'a number'}, got {value!r}")
        out[name] = kind(value)
    max_tokens = _int(body, "max_completion_tokens", 1)
    max_tokens = max_tokens if max_tokens is not None else _int(body, "max_tokens", 1)
    if max_tokens is not None:
        out["max_tokens"] = max_tokens
    stop = body.get("stop")
    if stop is not None:
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise bad_request("stop", "must be a string or a list of strings")
        out["stop"] = stop
    ids = body.get("stop_token_ids")
    if ids is not None:
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise bad_request("stop_token_ids", "must be a list of integers")
        out["stop_token_ids"] = ids
    if body.get("ignore_eos") is not None:
        if not isinstance(body["ignore_eos"], bool):
            raise bad_request("ignore_eos", "must be true or false")
        out["ignore_eos"] = body["ignore_eos"]
    return out


def _stream(body: Mapping[str, Any]) -> tuple[bool, bool]:
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise bad_request("stream", f"must be true or false, got {stream!r}")
    options = body.get("stream_options") or {}
    if not isinstance(options, Mapping):
        raise bad_request("stream_options", "must be an object")
    return stream, bool(options.get("include_usage"))


def _n(body: Mapping[str, Any], max_choices: int) -> int:
    n = _int(body, "n", 1) or 1
    if n > max_choices:
        raise bad_request("n", f"at most {max_choices} choices per request, got {n}")
    return n


def _content(message: Mapping[str, Any], i: int) -> str:
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):   # content parts: text ones only
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_request(f"messages[{i}].content[{j}]", "only text parts are supported")
            texts.append(part["text"])
        return "".join(texts)
    raise bad_request(f"messages[{i}].content", "must be a string or a list of text parts")


def chat(body: Mapping[str, Any], max_choices: int) -> Choices:
    _refuse(body, _REFUSED_CHAT)
    format_ = body.get("response_format")
    if isinstance(format_, Mapping) and format_.get("type") not in (None, "text"):
        raise bad_request("response_format", f"{format_.get('type')} is not supported (only text)")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages", "required: a non-empty list of {role, content}")
    chat_messages = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise bad_request(f"messages[{i}]", "must be an object with a role and content")
        role = "system" if message["role"] == "developer" else message["role"]
        chat_messages.append({"role": role, "content": _content(message, i)})
    stream, include_usage = _stream(body)
    return Choices([chat_messages], False, _sampling(body), _n(body, max_choices), stream, include_usage, "messages")


def completions(body: Mapping[str, Any], max_choices: int) -> Choices:
    _refuse(body, _REFUSED_COMPLETIONS)
    best_of = body.get("best_of")
    if best_of not in (None, 1):
        raise bad_request("best_of", "use a controller instead, e.g. model best_of_n?n=4")
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts: list[Any] = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, list) and p and all(
            isinstance(t, int) and not isinstance(t, bool) for t in p) for p in prompt):
        prompts = [list(p) for p in prompt]
    else:
        raise bad_request("prompt", "required: a string, a list of strings, or token ids")
    sampling = _sampling(body)
    sampling.setdefault("max_tokens", 16)    # OpenAI's default for /v1/completions
    stream, include_usage = _stream(body)
    n = _n(body, max_choices)
    if n * len(prompts) > max_choices:
        raise bad_request("n", f"{len(prompts)} prompts x n={n} exceeds {max_choices} choices per request")
    return Choices(prompts, True, sampling, n, stream, include_usage, "prompt")
