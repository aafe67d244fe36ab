"""Between the wire (protobuf) and the controllers' plain dataclasses."""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format, struct_pb2

from controllers import Candidate, Controller, Intermediate, Message, Progress, Prompt, Result
from trellis_rpc.errors import invalid
from trellis_rpc.finish_reasons import finish_reason_pb
from trellis_rpc.v1 import common_pb2, router_pb2

_INT32_LIMIT = 2**31


def prompt_from_pb(p: common_pb2.Prompt) -> Prompt:
    kind = p.WhichOneof("kind")
    if kind == "text":
        return Prompt(text=p.text)
    if kind == "chat":
        return Prompt(messages=tuple(Message(m.role, m.content) for m in p.chat.messages),
                      continue_final_message=p.chat.continue_final_message)
    return Prompt(token_ids=tuple(p.token_ids.ids))


def prompt_to_pb(p: Prompt) -> common_pb2.Prompt:
    if p.text is not None:
        return common_pb2.Prompt(text=p.text)
    if p.messages is not None:
        return common_pb2.Prompt(chat=common_pb2.ChatMessages(
            messages=[common_pb2.ChatMessage(role=m.role, content=m.content) for m in p.messages],
            continue_final_message=p.continue_final_message))
    return common_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=list(p.token_ids or ())))


def struct_to_dict(s: struct_pb2.Struct) -> dict[str, Any]:
    # Not json_format.MessageToDict: it raises ValueError on a NaN or infinite number_value (JSON has
    # neither), which a client can send in the binary encoding; that escaped as UNKNOWN. Here they stay
    # floats, and the controller's parameter check rejects them naming the parameter.
    return {key: _value(value) for key, value in s.fields.items()}


def _value(v: struct_pb2.Value) -> Any:
    kind = v.WhichOneof("kind")
    if kind == "struct_value":
        return struct_to_dict(v.struct_value)
    if kind == "list_value":
        return [_value(item) for item in v.list_value.values]
    if kind in ("number_value", "string_value", "bool_value"):
        return getattr(v, kind)
    return None  # null_value, or a Value with no kind set


def dict_to_struct(d: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(d)
    return s


def sampling_with_overrides(base: common_pb2.SamplingParams, overrides: dict[str, Any],
                            n: int) -> common_pb2.SamplingParams:
    merged = common_pb2.SamplingParams()
    merged.CopyFrom(base)
    for key, value in overrides.items():
        if key in ("stop", "stop_token_ids"):
            field = getattr(merged, key)
            del field[:]
            field.extend(value)
        else:
            try:
                setattr(merged, key, value)
            except (AttributeError, TypeError, ValueError) as exc:
                raise invalid(f"sampling.{key}", f"controller override rejected: {exc}") from exc
    merged.n = n
    return merged


def _int32(count: int) -> int:
    # Progress counts are int32 on the wire, and a controller's total can be a budget the client chose
    # (beam_search max_steps=1e12): setting it raised ValueError mid-run, which failed the run as UNKNOWN.
    return max(-_INT32_LIMIT, min(int(count), _INT32_LIMIT - 1))


def event_to_pb(event: Progress | Intermediate) -> dict[str, Any]:
    """The RunEvent oneof field for a controller event, as keyword arguments."""
    if isinstance(event, Progress):
        return {"progress": router_pb2.Progress(stage=event.stage, message=event.message,
                                                tasks_done=_int32(event.done), tasks_total=_int32(event.total))}
    return {"intermediate": router_pb2.Intermediate(
        kind=event.kind, branch=event.branch, answer=event.answer, value=event.value,
        details=dict_to_struct(event.details))}


def candidate_to_pb(c: Candidate) -> router_pb2.Candidate:
    return router_pb2.Candidate(branch=c.branch, text=c.text, answer=c.answer, score=c.score,
                                finish_reason=finish_reason_pb(c.finish_reason))


def result_to_pb(run_id: str, controller: str, result: Result, usage: common_pb2.Usage,
                 timings: router_pb2.RunTimings) -> router_pb2.RunResult:
    return router_pb2.RunResult(
        run_id=run_id, controller=controller, answer=result.answer, text=result.text,
        candidates=[candidate_to_pb(c) for c in result.candidates], details=dict_to_struct(result.details),
        usage=usage, timings=timings,
    )


def controller_spec_pb(cls: type[Controller], max_n: int) -> router_pb2.ControllerSpec:
    """A controller as ListControllers shows it; a parameter the n cap limits shows the caller's cap."""
    params = []
    for p in cls.params:
        spec = router_pb2.ParamSpec(name=p.name, type=p.type, description=p.description, choices=p.choices)
        json_format.ParseDict(p.default, spec.default)
        if p.minimum is not None:
            spec.minimum = p.minimum
        maximum = max_n if (p.limit or p.name) == "n" else p.maximum
        if maximum is not None:
            spec.maximum = maximum
        params.append(spec)
    return router_pb2.ControllerSpec(name=cls.name, description=cls.description, params=params)
