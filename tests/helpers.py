"""Small builders shared by the tests."""

from __future__ import annotations

from trellis_rpc.v1 import common_pb2, router_pb2


def chat(text: str) -> common_pb2.Prompt:
    return common_pb2.Prompt(chat=common_pb2.ChatMessages(messages=[common_pb2.ChatMessage(role="user", content=text)]))


def run_request(controller: str = "native_generation", prompt: common_pb2.Prompt | None = None,
                params: dict | None = None, stream_tokens: bool = True, run_id: str = "",
                **sampling) -> router_pb2.RunRequest:
    sampling.setdefault("max_tokens", 8)
    req = router_pb2.RunRequest(controller=controller, prompt=prompt or chat("What is 3 + 4?"),
                                sampling=common_pb2.SamplingParams(**sampling), stream_tokens=stream_tokens,
                                run_id=run_id)
    if params:
        req.params.update(params)
    return req


def rich_error(err) -> dict:
    """What a gRPC error's rich details (google.rpc.Status in grpc-status-details-bin) say, as any client in
    any language would decode them: {"fields": [...], "reason": str, "retry_ms": int} (absent: not sent)."""
    from google.rpc import error_details_pb2, status_pb2

    raw = dict(err.trailing_metadata() or ()).get("grpc-status-details-bin")
    out: dict = {}
    if raw is None:
        return out
    status = status_pb2.Status.FromString(raw)
    assert status.code == err.code().value[0] and status.message == err.details()
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            out["fields"] = [v.field for v in bad.field_violations]
        elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            out["reason"] = info.reason
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            out["retry_ms"] = retry.retry_delay.ToMilliseconds()
    return out


def eventually(check, timeout_s: float = 1.0, every_s: float = 0.01) -> None:
    """Poll check() until it holds or timeout_s passes (the caller asserts what it needed afterwards): for state
    another thread changes, such as an engine freeing blocks at its next step."""
    import time

    deadline = time.monotonic() + timeout_s
    while not check() and time.monotonic() < deadline:
        time.sleep(every_s)
