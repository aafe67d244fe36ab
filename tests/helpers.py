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
