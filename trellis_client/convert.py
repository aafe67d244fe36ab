"""Protobuf messages of trellis.v1 into the client's dataclasses."""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format, struct_pb2

from trellis_client import types as t
from trellis_client.errors import TrellisError
from trellis_rpc.v1 import common_pb2, router_pb2

_FINISH = {common_pb2.FINISH_REASON_STOP: "stop", common_pb2.FINISH_REASON_LENGTH: "length",
           common_pb2.FINISH_REASON_CANCELLED: "cancelled", common_pb2.FINISH_REASON_ERROR: "error"}


def plain(value: Any) -> Any:
    """google.protobuf.Struct carries every number as a double: give 8 back as 8, not 8.0."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def struct_dict(struct: struct_pb2.Struct) -> dict[str, Any]:
    return plain(json_format.MessageToDict(struct)) if struct.fields else {}


def finish_reason(value: int) -> str:
    return _FINISH.get(value, "")


def usage(u: common_pb2.Usage) -> t.Usage:
    return t.Usage(u.prompt_tokens, u.completion_tokens, u.cached_prompt_tokens, u.tasks)


def result(r: router_pb2.RunResult) -> t.Result:
    return t.Result(
        run_id=r.run_id, controller=r.controller, answer=r.answer, text=r.text,
        candidates=[t.Candidate(c.branch, c.text, c.answer, c.score, finish_reason(c.finish_reason))
                    for c in r.candidates],
        details=struct_dict(r.details), usage=usage(r.usage),
        timings=t.Timings(r.timings.queue_ms, r.timings.ttft_ms, r.timings.total_ms))


def event(ev: router_pb2.RunEvent) -> t.Event | None:
    """None for an event kind this client does not know (a newer router): skipped, not an error."""
    kind = ev.WhichOneof("event")
    rid, at = ev.run_id, ev.elapsed_ms
    if kind == "delta":     # the most frequent kind first
        return t.Delta(rid, at, ev.delta.branch, ev.delta.text, ev.delta.token_count)
    if kind == "progress":
        p = ev.progress
        return t.Progress(rid, at, p.stage, p.message, p.tasks_done, p.tasks_total)
    if kind == "intermediate":
        i = ev.intermediate
        return t.Intermediate(rid, at, i.kind, i.branch, i.answer, i.value, struct_dict(i.details))
    if kind == "started":
        return t.Started(rid, at, ev.started.controller, struct_dict(ev.started.params))
    if kind == "result":
        return t.Final(rid, at, result(ev.result))
    if kind == "error":
        e = ev.error
        return t.Failed(rid, at, TrellisError.from_parts(e.code, e.message, field=e.field, reason=e.reason))
    return None


def catalog(reply: router_pb2.ListControllersResponse) -> t.Catalog:
    controllers = []
    for c in reply.controllers:
        params = [t.ParamInfo(p.name, p.type, p.description,
                              plain(json_format.MessageToDict(p.default)) if p.HasField("default") else None,
                              p.minimum if p.HasField("minimum") else None,
                              p.maximum if p.HasField("maximum") else None, list(p.choices))
                  for p in c.params]
        controllers.append(t.ControllerInfo(c.name, c.description, params))
    return t.Catalog(controllers, list(reply.models))


def generation(r: common_pb2.GenerateResult) -> t.Generation:
    completions = [t.Completion(
        c.index, c.text, list(c.token_ids), finish_reason(c.finish_reason), c.stop_reason,
        [t.TokenLogprob(lp.token_id, lp.logprob, [t.TopLogprob(x.token_id, x.logprob, x.token) for x in lp.top])
         for lp in c.logprobs], c.cumulative_logprob) for c in r.completions]
    return t.Generation(completions, usage(r.usage),
                        t.Timings(r.timings.queue_ms, r.timings.ttft_ms, r.timings.latency_ms),
                        r.model_id, r.worker_id)


def scores(r: common_pb2.ScoreResult) -> t.Scores:
    return t.Scores([t.CandidateScore(s.index, s.score, list(s.step_scores)) for s in r.scores],
                    usage(r.usage), r.model_id, r.worker_id)
