"""FinishReason on the wire, and the names engines and controllers use for it ("stop", "length", "cancelled")."""

from __future__ import annotations

from trellis_rpc.v1 import common_pb2

_WIRE = {
    "stop": common_pb2.FINISH_REASON_STOP,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "cancelled": common_pb2.FINISH_REASON_CANCELLED,
}
_NAMES = {value: name for name, value in _WIRE.items()}


def finish_reason_pb(name: str) -> int:
    """The wire value of a finish reason's name; UNSPECIFIED for "" (not finished) or a name it does not know."""
    return _WIRE.get(name, common_pb2.FINISH_REASON_UNSPECIFIED)


def finish_reason_name(value: int) -> str:
    """The name of a wire finish reason; a sample whose result named none ended as "stop"."""
    return _NAMES.get(value, "stop")
