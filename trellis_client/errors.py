"""One exception for everything the router refuses or fails: the gRPC code, its message, and what gRPC's rich
error model adds (google.rpc.Status in `grpc-status-details-bin`): the field from BadRequest, the reason from
ErrorInfo, the retry delay from RetryInfo."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2, status_pb2

from trellis_rpc.errors import DETAILS_KEY, code_from_number


class TrellisError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, *, field: str = "", reason: str = "",
                 retry_after: float | None = None) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.field = field               # the request field at fault (INVALID_ARGUMENT), e.g. "params.n"
        self.reason = reason             # machine-readable cause, e.g. "CONTEXT_LENGTH_EXCEEDED"
        self.retry_after = retry_after   # seconds the router asked the caller to wait (RESOURCE_EXHAUSTED)

    @property
    def retryable(self) -> bool:
        """Whether the same request may succeed later: the router was full or no worker could take it."""
        return self.code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE)

    @classmethod
    def from_parts(cls, code: int, message: str, *, field: str = "", reason: str = "") -> TrellisError:
        return cls(code_from_number(code), message, field=field, reason=reason)

    @classmethod
    def from_rpc_error(cls, err: grpc.RpcError) -> TrellisError:
        """From a failed call of either grpc API (sync or aio); its trailers may carry the rich details."""
        code = err.code() if callable(getattr(err, "code", None)) else grpc.StatusCode.UNKNOWN
        message = err.details() if callable(getattr(err, "details", None)) else str(err)
        trailers = err.trailing_metadata() if callable(getattr(err, "trailing_metadata", None)) else None
        field, reason, retry_after = "", "", None
        raw = dict(trailers or ()).get(DETAILS_KEY)
        if raw:
            field, reason, retry_after = _details(raw)
        if retry_after is None:
            hint = dict(trailers or ()).get("retry-after-ms")
            if hint and str(hint).isdigit():
                retry_after = int(hint) / 1000
        return cls(code or grpc.StatusCode.UNKNOWN, message or "", field=field, reason=reason,
                   retry_after=retry_after)


def _details(raw: bytes) -> tuple[str, str, float | None]:
    field, reason, retry_after = "", "", None
    try:
        status = status_pb2.Status.FromString(raw)
    except Exception:   # a peer that sent something else under the key: the code and message still stand
        return field, reason, retry_after
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            if bad.field_violations:
                field = bad.field_violations[0].field
        elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_after = retry.retry_delay.ToMilliseconds() / 1000
    return field, reason, retry_after
