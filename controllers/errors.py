"""How a controller fails a run (ControllerError) and how a bad parameter is named (ParamError)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from controllers.tasks import TaskFailure


class ControllerError(Exception):
    """Fail the run. code is a gRPC status name ('UNAVAILABLE', 'INVALID_ARGUMENT', ...)."""

    def __init__(self, code: str, message: str, field: str = "", reason: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field          # the request field at fault, when a task's failure named one
        self.reason = reason        # a task failure's machine-readable reason, e.g. CONTEXT_LENGTH_EXCEEDED

    @classmethod
    def from_failure(cls, failure: TaskFailure, what: str = "") -> ControllerError:
        """Fail the run as the task failed: its code, field and reason, and its message after `what` (the
        controller's account of the step). A message naming a request field keeps the field first, so the
        client reads which field it was ('prompt: ... does not fit (warm-up failed)')."""
        if not what:
            message = failure.message
        elif failure.field:
            message = f"{failure.message} ({what})"
        else:
            message = f"{what}: {failure.message}"
        return cls(failure.code, message, failure.field, failure.reason)


class ParamError(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
