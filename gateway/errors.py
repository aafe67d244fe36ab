"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with the HTTP status an OpenAI
client expects, so its SDK raises the right exception class (BadRequestError, RateLimitError, ...)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import grpc

from trellis_client import TrellisError

# gRPC code -> (HTTP status, OpenAI error type)
_STATUS: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
    grpc.StatusCode.UNIMPLEMENTED: (501, "not_implemented_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
}

# The router names fields of its RunRequest; a gateway user wrote OpenAI's names.
_PARAM_NAMES = {"sampling.max_tokens": "max_tokens", "controller": "model", "model": "model"}


@dataclass
class APIError(Exception):
    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    retry_after: float | None = None

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        # Retry-After is whole seconds (RFC 9110); the SDKs also read the exact retry-after-ms
        if self.retry_after is None:
            return {}
        return {"retry-after": str(max(1, math.ceil(self.retry_after))),
                "retry-after-ms": str(int(self.retry_after * 1000))}


def bad_request(param: str, message: str, code: str | None = None) -> APIError:
    """400 naming the request parameter at fault; the message starts with it, as the router's do."""
    return APIError(400, f"{param}: {message}", "invalid_request_error", param, code)


def openai_param(field: str, prompt_param: str) -> str:
    """The router's field path in the names the caller used: sampling.temperature -> temperature,
    prompt -> messages (or prompt), params.n stays params.n (a controller parameter)."""
    if field in _PARAM_NAMES:
        return _PARAM_NAMES[field]
    if field == "prompt" or field.startswith("prompt."):
        return prompt_param
    if field.startswith("sampling."):
        return field.removeprefix("sampling.")
    return field


def from_trellis(err: TrellisError, prompt_param: str = "messages", model: str = "") -> APIError:
    if err.code == grpc.StatusCode.INVALID_ARGUMENT and err.field == "controller":
        # the `model` named no controller the router knows: what OpenAI answers for an unknown model
        return APIError(404, f"model: {model!r} is neither a controller nor a served model (GET /v1/models lists "
                             f"them); the router says: {err.message}", "invalid_request_error", "model",
                        "model_not_found")
    status, kind = _STATUS.get(err.code, (500, "server_error"))
    param = openai_param(err.field, prompt_param) if err.field else None
    code = err.reason.lower() if err.reason else ("rate_limit_exceeded" if status == 429 else None)
    if err.reason == "CONTEXT_LENGTH_EXCEEDED":
        code = "context_length_exceeded"     # OpenAI's own code for it
    return APIError(status, err.message, kind, param, code, err.retry_after if status == 429 else None)
