"""The caller's arguments into trellis.v1 requests. Field names are the contract's, so a mistyped sampling field
is a ValueError naming it here, before any call."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from trellis_rpc.v1 import common_pb2, router_pb2


@dataclass
class Sampling:
    """SamplingParams of the contract (common.proto); None leaves a field to the router's or the model's default."""
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    max_tokens: int | None = None
    min_tokens: int | None = None
    n: int | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    logprobs: int | None = None
    ignore_eos: bool = False


SAMPLING_FIELDS = frozenset(f.name for f in dataclasses.fields(Sampling))
PromptLike = str | Sequence[Mapping[str, str]] | Sequence[int] | common_pb2.Prompt
SamplingLike = Sampling | Mapping[str, Any] | None


def sampling_pb(sampling: SamplingLike) -> common_pb2.SamplingParams:
    if sampling is None:
        return common_pb2.SamplingParams()
    values = dataclasses.asdict(sampling) if isinstance(sampling, Sampling) else dict(sampling)
    unknown = sorted(set(values) - SAMPLING_FIELDS)
    if unknown:
        raise ValueError(f"sampling.{unknown[0]}: not a sampling field (known: {', '.join(sorted(SAMPLING_FIELDS))})")
    out = common_pb2.SamplingParams()
    for name, value in values.items():
        if value is None or (name in ("stop", "stop_token_ids") and not value):
            continue
        if name in ("stop", "stop_token_ids"):
            getattr(out, name).extend([value] if isinstance(value, str) else value)
        else:
            setattr(out, name, value)
    return out


def prompt_pb(prompt: PromptLike, *, raw: bool = False, system: str = "") -> common_pb2.Prompt:
    """A str is one user message, rendered with the model's chat template (raw=True: the text as is); a list of
    {"role", "content"} mappings is a chat; a list of ints is token ids of the worker's model."""
    if isinstance(prompt, common_pb2.Prompt):
        return prompt
    if isinstance(prompt, str):
        if raw:
            return common_pb2.Prompt(text=prompt)
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return prompt_pb(messages)
    items = list(prompt)
    if items and all(isinstance(x, int) for x in items):
        return common_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=items))
    chat = common_pb2.ChatMessages()
    for i, message in enumerate(items):
        if not isinstance(message, Mapping) or "content" not in message:
            raise ValueError(f"prompt[{i}]: a chat message is a mapping with 'role' and 'content'")
        chat.messages.add(role=str(message.get("role", "user")), content=str(message["content"]))
    return common_pb2.Prompt(chat=chat)


def run_request(controller: str, prompt: PromptLike, *, params: Mapping[str, Any] | None = None,
                sampling: SamplingLike = None, model: str = "", priority: int = 0, run_id: str = "",
                stream_tokens: bool = True, raw: bool = False, system: str = "") -> router_pb2.RunRequest:
    request = router_pb2.RunRequest(controller=controller, prompt=prompt_pb(prompt, raw=raw, system=system),
                                    sampling=sampling_pb(sampling), model=model, priority=priority,
                                    run_id=run_id, stream_tokens=stream_tokens)
    if params:
        request.params.update(dict(params))
    return request


def generate_request(prompt: PromptLike, *, sampling: SamplingLike = None, model: str = "",
                     raw: bool = False) -> router_pb2.GenerateRequest:
    return router_pb2.GenerateRequest(prompt=prompt_pb(prompt, raw=raw), sampling=sampling_pb(sampling), model=model)


_SCORE_KINDS = {"outcome": common_pb2.SCORE_KIND_OUTCOME, "process": common_pb2.SCORE_KIND_PROCESS,
                "verifier": common_pb2.SCORE_KIND_VERIFIER}


def score_request(prompt: PromptLike, candidates: Sequence[str], *, kind: str = "outcome", step_separator: str = "",
                  model: str = "", raw: bool = False) -> common_pb2.ScoreRequest:
    if kind not in _SCORE_KINDS:
        raise ValueError(f"kind: one of {', '.join(_SCORE_KINDS)}, got {kind!r}")
    return common_pb2.ScoreRequest(prompt=prompt_pb(prompt, raw=raw), candidates=list(candidates),
                                   kind=_SCORE_KINDS[kind], step_separator=step_separator, model=model)
