"""Drive a controller generator: run the tasks it yields, pass its events on, return its Result.

What a controller may yield:
- a task (Generate, Score, Branch) or a list of them: they run concurrently; resumes when all are done;
- WaitAny(tasks): starts them, resumes as soon as any is done (the rest keep running);
- Cancel(tasks): cancels running ones, resumes once they settled;
- Progress / Intermediate: streamed to the client; resumes at once.

The runtime knows nothing of where tasks run: a TaskRunner does the work (the router's runner sends
tasks to remote workers; tests use scripted runners). Whatever a run leaves running when it ends
(returns, fails or is cancelled by its client) is cancelled, so workers free its KV.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Protocol

from controllers.base import Controller, Result
from controllers.errors import ControllerError
from controllers.tasks import (
    Branch,
    Cancel,
    Generate,
    GenerateOutput,
    Intermediate,
    Progress,
    Prompt,
    Score,
    ScoreOutput,
    Task,
    TaskFailure,
    TokenDelta,
    Trace,
    WaitAny,
)

DeltaSink = Callable[[str, str, int], None]          # (branch, text, token_count), to the client
# Wraps each step a controller takes (what it yielded: tasks, WaitAny or Cancel) while the runtime carries it
# out; the router opens a tracing span here, so the tasks started in a step are its children.
StepScope = Callable[[str, int, object], AbstractContextManager]   # (controller path, step number, step)
TokenSink = Callable[[TokenDelta], None]             # a runner's deltas for one task
EventSink = Callable[[Progress | Intermediate], None]

TASK_TYPES = (Generate, Score, Branch)
# Events a controller may emit in a row before the driver lets the event loop run other work.
EVENTS_PER_YIELD = 64


class TaskFailed(Exception):
    def __init__(self, failure: TaskFailure) -> None:
        super().__init__(failure.message)
        self.failure = failure


class TaskRunner(Protocol):
    async def generate(self, task: Generate, on_token: TokenSink) -> GenerateOutput:
        """Run one generate task, reporting deltas as they come; raise TaskFailed when it cannot complete."""
        ...

    async def score(self, task: Score) -> ScoreOutput:
        """Run one score task; raise TaskFailed when it cannot complete."""
        ...


class EarlyStop(Exception):
    """Raised from a task's token callback when its stop_when predicate fires; the runner lets it pass
    (it stops reading the task, which cancels it on the worker)."""


class _Driver:
    """The tasks of one controller run (and of its branches): started, awaited, cancelled."""

    def __init__(self, runner: TaskRunner, on_event: EventSink, on_delta: DeltaSink, prefix: str = "",
                 step_scope: StepScope | None = None) -> None:
        self.runner = runner
        self.on_event = on_event
        self.on_delta = on_delta
        self.prefix = prefix
        self.step_scope = step_scope
        self.running: dict[int, tuple[Task, asyncio.Task]] = {}
        self.cancelled: set[int] = set()

    # ---- one task --------------------------------------------------------------------------

    def start(self, task: Task) -> asyncio.Task | None:
        if task.done:
            return None
        entry = self.running.get(id(task))
        if entry is None:
            entry = (task, asyncio.ensure_future(self._run(task)))
            self.running[id(task)] = entry
        return entry[1]

    async def _run(self, task: Task) -> None:
        try:
            if isinstance(task, Generate):
                task.output = await self._generate(task)
            elif isinstance(task, Score):
                task.output = await self.runner.score(task)
            else:
                task.result = await self._branch(task)
        except TaskFailed as exc:
            task.failure = exc.failure
        except ControllerError as exc:  # a branch's controller failed the branch
            task.failure = TaskFailure(exc.code, exc.message)
        except Exception as exc:  # a runner bug must still settle the task, or a WaitAny would wait forever
            task.failure = TaskFailure("INTERNAL", f"{type(task).__name__} task failed: {exc!r}")
        except asyncio.CancelledError:
            self._settle_cancelled(task)
            if id(task) not in self.cancelled:
                raise  # the whole run is being cancelled, not just this task
        finally:
            self.running.pop(id(task), None)

    def _settle_cancelled(self, task: Task) -> None:
        if task.done:
            return
        if isinstance(task, Generate):
            task.output = self._partial(task)
        else:
            task.failure = TaskFailure("CANCELLED", "cancelled by the controller")

    @staticmethod
    def _partial(task: Generate) -> GenerateOutput:
        traces = [task.traces.get(i, Trace(i)) for i in range(task.n)]
        samples = [trace.sample(trace.finish_reason or "cancelled") for trace in traces]
        return GenerateOutput(samples=samples, prompt_tokens=0,
                              completion_tokens=sum(s.token_count for s in samples))

    async def _generate(self, task: Generate) -> GenerateOutput:
        branch = f"{self.prefix}{task.branch}"

        def on_token(delta: TokenDelta) -> None:
            trace = task.traces.setdefault(delta.index, Trace(delta.index))
            trace.add(delta)
            if delta.text or delta.token_count:
                self.on_delta(f"{branch}/{delta.index}", delta.text, delta.token_count)
            if task.stop_when is not None and not task.stopped_early and task.stop_when(trace):
                task.stopped_early = True
                raise EarlyStop

        try:
            return await self.runner.generate(task, on_token)
        except EarlyStop:
            # Raised through the runner from its own delta callback: it stops reading the task, which
            # cancels it on the worker.
            return self._partial(task)

    async def _branch(self, task: Branch) -> Result:
        sub = _Driver(self.runner, self._branch_events(task.name), self.on_delta, f"{self.prefix}{task.name}/",
                      self.step_scope)
        return await sub.drive(task.controller, task.prompt)

    def _branch_events(self, name: str) -> EventSink:
        def forward(event: Progress | Intermediate) -> None:
            if isinstance(event, Intermediate):
                event.branch = f"{name}/{event.branch}" if event.branch else name
            else:
                event.message = f"{name}: {event.message}" if event.message else name
            self.on_event(event)
        return forward

    # ---- groups ----------------------------------------------------------------------------

    async def wait_all(self, tasks: list[Task]) -> None:
        pending = [t for t in (self.start(task) for task in tasks) if t is not None]
        if pending:
            await asyncio.wait(pending)

    async def wait_any(self, tasks: list[Task]) -> list[Task]:
        pending = [t for t in (self.start(task) for task in tasks) if t is not None]
        if pending and not any(task.done for task in tasks):
            await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        return [task for task in tasks if task.done]

    async def cancel(self, tasks: list[Task]) -> None:
        futures = []
        for task in tasks:
            entry = self.running.get(id(task))
            if entry is not None:
                self.cancelled.add(id(task))
                entry[1].cancel()
                futures.append(entry[1])
        if futures:
            await asyncio.wait(futures)

    async def close(self) -> None:
        """Cancel whatever is still running (the controller returned without waiting for it)."""
        await self.cancel([task for task, _ in list(self.running.values())])

    # ---- the controller --------------------------------------------------------------------

    async def drive(self, controller: Controller, prompt: Prompt) -> Result:
        gen = controller.run(prompt)
        reply = None
        steps = events = 0
        try:
            while True:
                try:
                    step = gen.send(reply)
                except StopIteration as stop:
                    if not isinstance(stop.value, Result):
                        raise ControllerError("INTERNAL", f"controller {controller.name} returned "
                                                          f"{stop.value!r}, not a Result") from None
                    return stop.value
                if isinstance(step, (Progress, Intermediate)):
                    events += 1
                    if events % EVENTS_PER_YIELD == 0:
                        # Events never suspend: a controller emitting thousands in a row (MCTS revisits) would
                        # hold the event loop, and with it every other run and its own cancellation.
                        await asyncio.sleep(0)
                if self.step_scope is None or isinstance(step, (Progress, Intermediate)):
                    scope = contextlib.nullcontext()
                else:
                    steps += 1
                    scope = self.step_scope(f"{self.prefix}{controller.name}", steps, step)
                with scope:
                    reply = await self._do(controller, step)
        finally:
            gen.close()
            await asyncio.shield(self.close())

    async def _do(self, controller: Controller, step: object) -> object:
        if isinstance(step, (Progress, Intermediate)):
            self.on_event(step)
            return None
        if isinstance(step, TASK_TYPES):
            await self.wait_all([step])
            return step
        if isinstance(step, list) and all(isinstance(t, TASK_TYPES) for t in step):
            await self.wait_all(step)
            return step
        if isinstance(step, WaitAny):
            return await self.wait_any(step.tasks)
        if isinstance(step, Cancel):
            await self.cancel(step.tasks)
            return step.tasks
        raise ControllerError("INTERNAL", f"controller {controller.name} yielded {type(step).__name__}, expected "
                                          f"a task, a list of tasks, WaitAny, Cancel or an event")


async def drive(controller: Controller, prompt: Prompt, runner: TaskRunner,
                on_event: EventSink, on_delta: DeltaSink, step_scope: StepScope | None = None) -> Result:
    """Run `controller` on `prompt` to its Result; deltas and events go to the sinks as they happen."""
    return await _Driver(runner, on_event, on_delta, step_scope=step_scope).drive(controller, prompt)
