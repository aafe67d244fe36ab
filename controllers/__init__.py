"""Inference-time compute methods as plain Python generators. Imports neither grpc nor torch:
the same controller objects run in the router against remote workers and in-process in tests."""

from controllers.base import Controller, Param, Reallocation, Result, register
from controllers.errors import ControllerError, ParamError
from controllers.registry import REGISTRY, controller_class
from controllers.tasks import (
    CONTEXT_LENGTH_EXCEEDED,
    Branch,
    Cancel,
    Candidate,
    Generate,
    GenerateOutput,
    Intermediate,
    Message,
    Progress,
    Prompt,
    SampleOut,
    Score,
    ScoreOutput,
    TaskFailure,
    TokenDelta,
    Trace,
    WaitAny,
)

__all__ = [
    "CONTEXT_LENGTH_EXCEEDED", "Branch", "Cancel", "Candidate", "Controller", "ControllerError", "Generate",
    "GenerateOutput", "Intermediate", "Message", "Param", "ParamError", "Progress", "Prompt", "REGISTRY",
    "Reallocation", "Result",
    "SampleOut", "Score", "ScoreOutput", "TaskFailure", "TokenDelta", "Trace", "WaitAny", "controller_class",
    "register",
]
