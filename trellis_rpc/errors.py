"""Errors that carry a gRPC status code, raised below the servicers and mapped at the edge."""

from __future__ import annotations

from dataclasses import dataclass

import grpc


@dataclass
class StatusError(Exception):
    code: grpc.StatusCode
    message: str
    field: str = ""
    reason: str = ""     # machine-readable cause (TaskError.reason), e.g. CONTEXT_LENGTH_EXCEEDED

    def __str__(self) -> str:
        return self.message


def _with(code: grpc.StatusCode):
    """A constructor for one status code, so engines raise statuses without importing grpc themselves."""
    def make(message: str, field: str = "") -> StatusError:
        return StatusError(code, message, field)
    make.__name__ = code.name.lower()
    return make


not_found = _with(grpc.StatusCode.NOT_FOUND)
resource_exhausted = _with(grpc.StatusCode.RESOURCE_EXHAUSTED)
failed_precondition = _with(grpc.StatusCode.FAILED_PRECONDITION)
unavailable = _with(grpc.StatusCode.UNAVAILABLE)
deadline_exceeded = _with(grpc.StatusCode.DEADLINE_EXCEEDED)
internal = _with(grpc.StatusCode.INTERNAL)


def invalid(field: str, message: str) -> StatusError:
    """INVALID_ARGUMENT whose message starts with the offending field, e.g. 'sampling.n: must be >= 1'."""
    return StatusError(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {message}", field)


# TaskError.reason of a text that does not fit the model's context (worker.proto).
CONTEXT_LENGTH_EXCEEDED = "CONTEXT_LENGTH_EXCEEDED"


def context_exceeded(field: str, message: str) -> StatusError:
    """INVALID_ARGUMENT naming `field`, with the reason that lets a controller tell it from other bad input."""
    return StatusError(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {message}", field, CONTEXT_LENGTH_EXCEEDED)


# The trailer gRPC's rich error model travels in (a serialized google.rpc.Status): written by the router's edge,
# read by its clients.
DETAILS_KEY = "grpc-status-details-bin"

_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def code_from_number(number: int) -> grpc.StatusCode:
    return _BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)


def code_number(code: grpc.StatusCode) -> int:
    return code.value[0]
