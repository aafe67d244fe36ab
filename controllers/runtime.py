"""Drive a controller generator: run the tasks it yields concurrently, pass its events on, return its Result.

The runtime knows nothing of where tasks run: a TaskRunner does the work (the router's runner sends
tasks to remote workers; tests use scripted runners).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from controllers.base import Controller, ControllerError, Result
from controllers.tasks import Generate, GenerateOutput, Intermediate, Progress, Prompt, TaskFailure

DeltaSink = Callable[[str, str, int], None]          # (branch, text, token_count)
EventSink = Callable[[Progress | Intermediate], None]


class TaskFailed(Exception):
    def __init__(self, failure: TaskFailure) -> None:
        super().__init__(failure.message)
        self.failure = failure


class TaskRunner(Protocol):
    async def generate(self, task: Generate, on_delta: DeltaSink) -> GenerateOutput:
        """Run one generate task; raise TaskFailed when it cannot complete."""
        ...


async def _run_task(task: Generate, runner: TaskRunner, on_delta: DeltaSink) -> None:
    try:
        task.output = await runner.generate(task, on_delta)
    except TaskFailed as exc:
        task.failure = exc.failure


async def drive(controller: Controller, prompt: Prompt, runner: TaskRunner,
                on_event: EventSink, on_delta: DeltaSink) -> Result:
    gen = controller.run(prompt)
    reply = None
    while True:
        try:
            step = gen.send(reply)
        except StopIteration as stop:
            if not isinstance(stop.value, Result):
                raise ControllerError(
                    "INTERNAL", f"controller {controller.name} returned {stop.value!r}, not a Result") from None
            return stop.value
        reply = None
        if isinstance(step, (Progress, Intermediate)):
            on_event(step)
        elif isinstance(step, Generate):
            await _run_task(step, runner, on_delta)
            reply = step
        elif isinstance(step, list) and all(isinstance(t, Generate) for t in step):
            await asyncio.gather(*(_run_task(t, runner, on_delta) for t in step))
            reply = step
        else:
            gen.close()
            raise ControllerError("INTERNAL", f"controller {controller.name} yielded {type(step).__name__}, "
                                              f"expected a task, a list of tasks or an event")
