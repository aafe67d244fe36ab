"""Trellis results and events in OpenAI's response shapes: `chat.completion`, `chat.completion.chunk`,
`text_completion`.

Everything Trellis adds travels in a `trellis` field next to OpenAI's own, which OpenAI clients ignore (the
SDKs keep it as an extra attribute): on a response, the run's answer, details and timings per choice; on a
stream chunk, the controller event it carries (progress, votes, scores, other branches' text).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trellis_client import Delta, Event, Intermediate, Progress, Result, Started


@dataclass(frozen=True)
class Shape:
    chat: bool          # chat completions, else (legacy) completions
    id: str
    created: int
    model: str          # echoed as the caller wrote it

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    @property
    def chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"


def finish_reason(result: Result) -> str:
    """The chosen text's own ending: "length" when it was cut at max_tokens or the context, else "stop"."""
    chosen = next((c for c in result.candidates if c.text == result.text), None)
    if chosen is None and len(result.candidates) == 1:
        chosen = result.candidates[0]
    return "length" if chosen is not None and chosen.finish_reason == "length" else "stop"


def run_summary(result: Result) -> dict[str, Any]:
    return {"run_id": result.run_id, "controller": result.controller, "answer": result.answer,
            "details": result.details, "candidates": len(result.candidates),
            "usage": {"prompt_tokens": result.usage.prompt_tokens,
                      "completion_tokens": result.usage.completion_tokens,
                      "cached_prompt_tokens": result.usage.cached_prompt_tokens, "tasks": result.usage.tasks},
            "timings": {"queue_ms": result.timings.queue_ms, "ttft_ms": result.timings.ttft_ms,
                        "total_ms": result.timings.total_ms}}


def usage(results: list[Result]) -> dict[str, Any]:
    """All tokens the method spent: every branch's completion tokens, every task's prompt tokens."""
    prompt = sum(r.usage.prompt_tokens for r in results)
    completion = sum(r.usage.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(r.usage.cached_prompt_tokens for r in results)}}


def response(shape: Shape, results: list[Result]) -> dict[str, Any]:
    """The non-streamed answer; results[i] is choice i."""
    choices = []
    for i, r in enumerate(results):
        choice: dict[str, Any] = {"index": i, "finish_reason": finish_reason(r), "logprobs": None}
        if shape.chat:
            choice["message"] = {"role": "assistant", "content": r.text, "refusal": None}
        else:
            choice["text"] = r.text
        choice["trellis"] = run_summary(r)
        choices.append(choice)
    return {"id": shape.id, "object": shape.object, "created": shape.created, "model": shape.model,
            "choices": choices, "usage": usage(results)}


def chunk(shape: Shape, index: int, text: str | None = None, *, role: bool = False, finish: str | None = None,
          trellis: dict[str, Any] | None = None) -> dict[str, Any]:
    if shape.chat:
        delta: dict[str, Any] = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        choice: dict[str, Any] = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
    else:
        choice = {"index": index, "text": text or "", "finish_reason": finish, "logprobs": None}
    out = {"id": shape.id, "object": shape.chunk_object, "created": shape.created, "model": shape.model,
           "choices": [choice]}
    if trellis is not None:
        out["trellis"] = trellis
    return out


def content_frame(shape: Shape, index: int) -> tuple[bytes, bytes]:
    """The SSE frame of a content chunk split around its text: the hot path fills in json.dumps(text) only,
    instead of building and serializing a whole chunk per token. Same bytes as chunk(shape, index, text)."""
    import json

    marker = "\u0000TEXT\u0000"
    whole = json.dumps(chunk(shape, index, marker), separators=(",", ":"), ensure_ascii=False)
    head, _, tail = whole.partition(json.dumps(marker, ensure_ascii=False))
    return b"data: " + head.encode(), tail.encode() + b"\n\n"


def usage_chunk(shape: Shape, results: list[Result]) -> dict[str, Any]:
    """stream_options.include_usage: one last chunk with no choices and the usage of the whole request."""
    return {"id": shape.id, "object": shape.chunk_object, "created": shape.created, "model": shape.model,
            "choices": [], "usage": usage(results)}


def event_fields(event: Event) -> dict[str, Any] | None:
    """A controller event as the `trellis` field of a chunk; None for events not sent this way."""
    if isinstance(event, Delta):
        return {"type": "delta", "run_id": event.run_id, "elapsed_ms": event.elapsed_ms, "branch": event.branch,
                "text": event.text, "token_count": event.token_count}
    if isinstance(event, Progress):
        return {"type": "progress", "run_id": event.run_id, "elapsed_ms": event.elapsed_ms, "stage": event.stage,
                "message": event.message, "tasks_done": event.tasks_done, "tasks_total": event.tasks_total}
    if isinstance(event, Intermediate):
        return {"type": "intermediate", "run_id": event.run_id, "elapsed_ms": event.elapsed_ms,
                "kind": event.kind, "branch": event.branch, "answer": event.answer, "value": event.value,
                "details": event.details}
    if isinstance(event, Started):
        return {"type": "started", "run_id": event.run_id, "elapsed_ms": event.elapsed_ms,
                "controller": event.controller, "params": event.params}
    return None
