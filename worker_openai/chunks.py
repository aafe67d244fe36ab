"""One streamed chunk of /completions or /chat/completions -> text, tokens with their logprobs, finish reason.

Token ids: an OpenAI API streams text, not ids. They come from the upstream where it can say them (vLLM's
`return_tokens_as_token_ids` spells a logprob token 'token_id:123'), else from the model's tokenizer
(--tokenizer) on the chunk's text, else each token counts as one id of -1 (the count is still right where the
upstream streams one token per chunk or returns logprobs, which every server here does).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from worker_runtime.engine_api import TokenLogprob, TopLogprob

UNKNOWN_TOKEN_ID = -1

# The upstream's finish reasons -> Trellis' ("stop" | "length" | "cancelled").
_FINISH = {"stop": "stop", "eos": "stop", "length": "length", "abort": "cancelled", "cancelled": "cancelled",
           "tool_calls": "stop", "function_call": "stop", "content_filter": "stop"}


@dataclass
class Piece:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str = ""
    stop_reason: str = ""


def _token_id(token: str, tokenizer) -> int:
    if token.startswith("token_id:"):
        try:
            return int(token[9:])
        except ValueError:
            pass
    if tokenizer is not None:
        ids = tokenizer.encode(token, add_special_tokens=False)
        if len(ids) == 1:
            return ids[0]
    return UNKNOWN_TOKEN_ID


def _completion_logprobs(lp: dict, tokenizer) -> list[TokenLogprob]:
    tokens = lp.get("tokens") or []
    values = lp.get("token_logprobs") or []
    tops = lp.get("top_logprobs") or []
    out = []
    for i, token in enumerate(tokens):
        top = tops[i] if i < len(tops) and tops[i] else {}
        ranked = sorted(top.items(), key=lambda kv: -kv[1])
        out.append(TokenLogprob(
            token_id=_token_id(token, tokenizer), logprob=float(values[i]) if i < len(values) else 0.0,
            top=[TopLogprob(_token_id(t, tokenizer), float(v), _spelled(t)) for t, v in ranked]))
    return out


def _chat_logprobs(lp: dict, tokenizer) -> list[TokenLogprob]:
    return [
        TokenLogprob(token_id=_token_id(item["token"], tokenizer), logprob=float(item["logprob"]),
                     top=[TopLogprob(_token_id(t["token"], tokenizer), float(t["logprob"]), _spelled(t["token"]))
                          for t in item.get("top_logprobs") or []])
        for item in lp.get("content") or []
    ]


def _spelled(token: str) -> str:
    return "" if token.startswith("token_id:") else token


def parse_choice(choice: dict, tokenizer) -> Piece:
    """A choice of a completions chunk ("text") or a chat chunk ("delta": {"content"})."""
    chat = "delta" in choice
    text = ((choice.get("delta") or {}).get("content") if chat else choice.get("text")) or ""
    lp = choice.get("logprobs")
    logprobs = (_chat_logprobs(lp, tokenizer) if chat else _completion_logprobs(lp, tokenizer)) if lp else []
    if logprobs:
        ids = [t.token_id for t in logprobs]
        if UNKNOWN_TOKEN_ID in ids and tokenizer is not None and text:
            ids = tokenizer.encode(text, add_special_tokens=False)
    elif tokenizer is not None:
        ids = tokenizer.encode(text, add_special_tokens=False) if text else []
    else:
        ids = [UNKNOWN_TOKEN_ID] if text else []
    reason = choice.get("finish_reason") or ""
    stop_reason = choice.get("stop_reason")
    return Piece(text=text, token_ids=ids, logprobs=logprobs,
                 finish_reason=_FINISH.get(reason, "stop") if reason else "",
                 stop_reason=stop_reason if isinstance(stop_reason, str) else "")
