"""SamplingConfig -> the fields of one upstream request, per upstream kind.

Every field Trellis has is either sent (the OpenAI field, or the kind's known extension) or refused with
INVALID_ARGUMENT naming it: an upstream that ignores a field would silently sample from another distribution
than the one the controller asked for. A field at its default (top_k 0, min_p 0, repetition_penalty 1, ...)
asks for nothing and is never refused.

Sources for what each server accepts: vLLM's and SGLang's protocol.py (CompletionRequest /
ChatCompletionRequest extras), llama.cpp's tools/server (and llama-cpp-python's server, which agree on
top_k, min_p and repeat_penalty), TensorRT-LLM's serve/openai_protocol.py, transformers' cli/serving, and
the OpenAI API reference (logprobs at most 5 on completions, at most 4 stop strings).
"""

from __future__ import annotations

from dataclasses import dataclass

from trellis_rpc.errors import invalid
from trellis_rpc.sampling import SamplingConfig

# The fields beyond OpenAI's that a kind takes, as Trellis name -> the upstream's name.
_VLLM_LIKE = {"top_k": "top_k", "min_p": "min_p", "min_tokens": "min_tokens", "stop_token_ids": "stop_token_ids",
              "repetition_penalty": "repetition_penalty", "ignore_eos": "ignore_eos"}


@dataclass(frozen=True)
class UpstreamKind:
    name: str
    extensions: dict[str, str]        # Trellis field -> the upstream's request field
    max_logprobs: int | None = 20     # None: the upstream returns no logprobs at all
    max_stop: int | None = None
    presence_penalty: bool = True
    frequency_penalty: bool = True
    seed: bool = True
    stop: bool = True                 # False: the upstream's stop strings differ from OpenAI's; the worker alone
                                      # applies them (it always does too, and closes the stream at a match)
    token_ids_in_logprobs: str = ""   # a request field that makes logprob tokens say their ids
    chat_continuation: bool = False   # chat completions can continue the final (assistant) message
    token_prompts: bool = True        # /completions takes a prompt of token ids


KINDS: dict[str, UpstreamKind] = {k.name: k for k in (
    UpstreamKind("vllm", _VLLM_LIKE, token_ids_in_logprobs="return_tokens_as_token_ids", chat_continuation=True),
    UpstreamKind("sglang", _VLLM_LIKE, chat_continuation=True),
    UpstreamKind("trtllm", _VLLM_LIKE),
    UpstreamKind("llamacpp", {"top_k": "top_k", "min_p": "min_p", "repetition_penalty": "repeat_penalty"}),
    UpstreamKind("openai", {}, max_logprobs=5, max_stop=4),
    # transformers serve: temperature, top_p, max_tokens and seed; it ignores logprobs and presence_penalty,
    # reads frequency_penalty as a repetition penalty (refused), at a stop string drops only the last token's
    # text (so the worker matches stop strings itself), and takes text prompts only. For anything not sent it
    # applies the model's generation_config (top_k 50 unless the model says otherwise).
    UpstreamKind("transformers", {}, max_logprobs=None, presence_penalty=False, frequency_penalty=False, stop=False,
                 token_prompts=False),
)}


def _refuse(kind: UpstreamKind, field: str, what: str) -> None:
    raise invalid(f"sampling.{field}", f"this worker's upstream ({kind.name}) {what}; leave it unset or "
                                       f"route the task to another pool")


def sampling_fields(kind: UpstreamKind, cfg: SamplingConfig, seed: int | None) -> dict:
    """The request body's sampling fields for one sample (n is always 1: samples are separate requests)."""
    body: dict = {"max_tokens": cfg.max_tokens, "temperature": cfg.temperature, "top_p": cfg.top_p}
    if cfg.stop and kind.stop:
        if kind.max_stop is not None and len(cfg.stop) > kind.max_stop:
            _refuse(kind, "stop", f"takes at most {kind.max_stop} stop strings, got {len(cfg.stop)}")
        body["stop"] = list(cfg.stop)
    if seed is not None:
        if not kind.seed:
            _refuse(kind, "seed", "has no seed")
        body["seed"] = seed
    for field, allowed in (("frequency_penalty", kind.frequency_penalty), ("presence_penalty", kind.presence_penalty)):
        value = getattr(cfg, field)
        if value != 0.0:
            if not allowed:
                _refuse(kind, field, f"does not honour {field}")
            body[field] = value
    if cfg.logprobs is not None:
        if kind.max_logprobs is None:
            _refuse(kind, "logprobs", "returns no logprobs")
        if cfg.logprobs > kind.max_logprobs:
            _refuse(kind, "logprobs", f"returns at most {kind.max_logprobs} top logprobs, asked for {cfg.logprobs}")
    extras = {"top_k": cfg.top_k != 0, "min_p": cfg.min_p != 0.0, "min_tokens": cfg.min_tokens != 0,
              "stop_token_ids": bool(cfg.stop_token_ids), "repetition_penalty": cfg.repetition_penalty != 1.0,
              "ignore_eos": cfg.ignore_eos}
    for field, asked in extras.items():
        if not asked:
            continue
        name = kind.extensions.get(field)
        if name is None:
            _refuse(kind, field, f"has no {field}")
        value = getattr(cfg, field)
        body[name] = list(value) if isinstance(value, tuple) else value
    return body
