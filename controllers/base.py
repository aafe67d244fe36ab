"""The controller programming model: a generator that yields tasks and events and returns a Result.

    def run(self, prompt):
        task = Generate(prompt, n=self.n)
        yield [task]                  # a list of tasks runs concurrently; resumes when all are done
        yield Progress("voting")      # events stream to the client, the generator resumes at once
        return Result(answer=...)

Failed tasks come back with `failure` set instead of `output`: the controller decides what a
failure means, or raises ControllerError to fail the run with a status.
"""

from __future__ import annotations

import math
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any, ClassVar

from controllers.errors import ParamError
from controllers.tasks import Cancel, Candidate, Intermediate, Progress, Prompt, Task, WaitAny

# What a controller may yield (controllers.runtime.drive): a task or a list of tasks (run together, resumed
# when all are done), WaitAny (resumed at the first done), Cancel, or an event (resumed at once).
Step = Task | list[Task] | WaitAny | Cancel | Progress | Intermediate


@dataclass
class Result:
    answer: str
    text: str = ""
    candidates: list[Candidate] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}
# The largest value of a parameter that goes into an int32 field of SamplingParams (max_tokens): a larger one
# cannot be sent to a worker at all.
INT32_MAX = 2**31 - 1


def _number(x: float) -> str:
    """A bound as a person writes it: 2147483647, not 2.14748e+09."""
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


@dataclass(frozen=True)
class Param:
    name: str
    type: str                       # "int" | "float" | "str" | "bool"
    default: Any
    description: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    # The router limit (by name) that caps this parameter; empty: the limit named like it. A width that is the
    # n of a generate task (tree_of_thoughts' breadth) names "n": uncapped, breadth=1e9 made the router allocate
    # a billion samples' state before any worker could refuse the task.
    limit: str = ""

    def check(self, value: Any, field: str) -> Any:
        if self.type == "int" and isinstance(value, float) and value.is_integer():
            value = int(value)  # protobuf Struct carries every number as a double
        if (isinstance(value, bool) and self.type != "bool") or not isinstance(value, _TYPES[self.type]):
            raise ParamError(field, f"must be of type {self.type}, got {type(value).__name__}")
        if self.type == "float" and not math.isfinite(value):
            # NaN compares false with every bound and infinity passes a one-sided one (mcts exploration): both
            # reach the wire in a Struct's binary encoding, and neither means anything as a parameter.
            raise ParamError(field, f"must be a finite number, got {value}")
        if self.minimum is not None and value < self.minimum:
            raise ParamError(field, f"must be >= {_number(self.minimum)}, got {value}")
        if self.maximum is not None and value > self.maximum:
            raise ParamError(field, f"must be <= {_number(self.maximum)}, got {value}")
        if self.choices and value not in self.choices:
            raise ParamError(field, f"must be one of {', '.join(self.choices)}, got {value!r}")
        return float(value) if self.type == "float" else value


class Controller:
    name: ClassVar[str]
    description: ClassVar[str]
    params: ClassVar[tuple[Param, ...]] = ()

    def __init__(self, **params: Any) -> None:
        for key, value in params.items():
            setattr(self, key, value)

    @classmethod
    def from_params(cls, raw: dict[str, Any], limits: dict[str, float] | None = None,
                    prefix: str = "params") -> Controller:
        """Validate raw parameters (unknown names rejected, defaults applied, router limits enforced)."""
        known = {p.name: p for p in cls.params}
        for key in raw:
            if key not in known:
                names = ", ".join(known) or "none"
                raise ParamError(f"{prefix}.{key}", f"unknown parameter of {cls.name} (known: {names})")
        values = {}
        for p in cls.params:
            field_name = f"{prefix}.{p.name}"
            value = p.check(raw[p.name], field_name) if p.name in raw else p.default
            cap = (limits or {}).get(p.limit or p.name)
            if cap is not None and value > cap:
                limit = f" on {p.limit}" if p.limit else ""
                raise ParamError(field_name, f"must be <= {cap:g} (this router's limit{limit}), got {value}")
            values[p.name] = value
        return cls(**values)

    def param_values(self) -> dict[str, Any]:
        return {p.name: getattr(self, p.name) for p in self.params}

    def run(self, prompt: Prompt) -> Generator[Step, Any, Result]:
        raise NotImplementedError


# Every controller by name, in the order they registered: controllers/registry.py loads the controller
# modules in the order ListControllers shows them.
REGISTRY: dict[str, type[Controller]] = {}


def register(cls: type[Controller]) -> type[Controller]:
    """Class decorator: the controller can be run by name (RunRequest.controller)."""
    REGISTRY[cls.name] = cls
    return cls
