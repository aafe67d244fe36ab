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

import json
import math
from collections.abc import Callable, Generator
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


# What a parameter of each type must arrive as, in the terms of google.protobuf.Value (RunRequest.params is a
# Struct), and the field protobufjs users write it in: protobufjs defines Struct and Value with camelCase field
# names even under keepCase, so `{n: {number_value: 8}}` is an unknown key it drops, and an empty Value arrives.
_EXPECTED = {"int": "a number", "float": "a number", "str": "a string", "bool": "a bool"}
_VALUE_FIELD = {"int": "numberValue, not number_value", "float": "numberValue, not number_value",
                "str": "stringValue, not string_value", "bool": "boolValue, not bool_value"}


def _plain(value: Any) -> Any:
    """Wire numbers are doubles: shown as the client wrote them, [8, 2.5] rather than [8.0, 2.5]."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _shown(value: Any, limit: int = 40) -> str:
    text = json.dumps(_plain(value), default=str, ensure_ascii=False)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _arrived(value: Any, expected: str) -> str:
    """A parameter's value as it arrived on the wire. The router turns RunRequest.params into Python values
    (router/convert.py): number_value a float, string_value a str, bool_value a bool, list_value a list,
    struct_value a dict, null_value and a Value with no kind set None."""
    if value is None:
        return f"no value (a null or empty google.protobuf.Value; protobufjs users: {_VALUE_FIELD[expected]})"
    if isinstance(value, bool):
        return f"a bool ({'true' if value else 'false'})"
    if isinstance(value, int | float):
        return f"a number ({_number(value) if abs(value) < 1e15 else f'{value:g}'})"
    if isinstance(value, str):
        return f"a string ({_shown(value)})"
    if isinstance(value, list | tuple):
        return f"a list ({_shown(list(value))})"
    if isinstance(value, dict):
        return f"a struct ({_shown(value)})"
    return f"a {type(value).__name__}"  # not from the wire: a Python caller of from_params


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
            number = isinstance(value, int | float) and not isinstance(value, bool)
            expected = "a whole number" if self.type == "int" and number else _EXPECTED[self.type]
            raise ParamError(field, f"expected {expected}, got {_arrived(value, self.type)}")
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


@dataclass(frozen=True)
class Reallocation:
    """What the service offers a controller that can spend less (certaindex): while `under_load()` says capacity is
    short, a run already this certain of its answer may stop spending, so the capacity goes to runs still
    undecided. The router offers it only when configured to (`--reallocate certaindex`), because stopping on
    certainty can change an answer; stopping where it cannot (a vote that can no longer be overtaken) needs no
    offer."""

    under_load: Callable[[], bool]
    certainty: float = 0.95


class Controller:
    name: ClassVar[str]
    description: ClassVar[str]
    params: ClassVar[tuple[Param, ...]] = ()
    reallocation: Reallocation | None = None     # set by the router on the run's controller, when it offers one

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
