"""Errors in gRPC's rich error model (google.rpc.Status in `grpc-status-details-bin`), so a client in any
language reads what went wrong without parsing the message: BadRequest.FieldViolation names the field of an
INVALID_ARGUMENT, ErrorInfo carries the machine-readable reason (CONTEXT_LENGTH_EXCEEDED, ...), RetryInfo
says when to retry a RESOURCE_EXHAUSTED. The status code and message stay as they are: a client that knows
nothing of details loses nothing."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

from router.admission import Exhausted
from trellis_rpc.errors import DETAILS_KEY, StatusError, code_number

DOMAIN = "trellis.ai"


def status_details(err: StatusError, retry_after_ms: int = 0) -> bytes | None:
    """The serialized google.rpc.Status for err, or None when it has nothing to add to code and message."""
    details = []
    if err.field:
        details.append(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=err.field, description=err.message)]))
    if err.reason:
        details.append(error_details_pb2.ErrorInfo(reason=err.reason, domain=DOMAIN,
                                                   metadata={"field": err.field} if err.field else {}))
    if retry_after_ms:
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(retry_after_ms)
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    if not details:
        return None
    packed = []
    for detail in details:
        holder = any_pb2.Any()
        holder.Pack(detail)
        packed.append(holder)
    return status_pb2.Status(code=code_number(err.code), message=err.message, details=packed).SerializeToString()


async def abort(context: grpc.aio.ServicerContext, err: StatusError) -> None:
    """End the RPC with err's code and message, its details, and `retry-after-ms` when the router is full."""
    retry_after_ms = err.retry_after_ms if isinstance(err, Exhausted) else 0
    trailers = [("retry-after-ms", str(retry_after_ms))] if retry_after_ms else []
    details = status_details(err, retry_after_ms)
    if details is not None:
        trailers.append((DETAILS_KEY, details))
    if trailers:
        context.set_trailing_metadata(tuple(trailers))
    await context.abort(err.code, err.message)
