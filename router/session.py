"""Router.Session: many runs over one bidirectional stream, their events interleaved and matched by run_id.

The client starts runs and cancels them by run_id; a run's failure is a RunError event, not the end of the
stream, so one bad run never takes its neighbours down. When the client half-closes, the runs it started
finish and then the stream ends.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from router.auth import ClientPolicy
from router.events import run_events
from router.runs import PreparedRun, Runs
from trellis_rpc.errors import StatusError, code_number, invalid
from trellis_rpc.v1 import router_pb2

_DONE = object()


def error_event(run_id: str, err: StatusError) -> router_pb2.RunEvent:
    return router_pb2.RunEvent(run_id=run_id, error=router_pb2.RunError(
        code=code_number(err.code), message=err.message, field=err.field, reason=err.reason))


class Session:
    def __init__(self, runs: Runs, client: ClientPolicy, trace_parent: object, deadline: float | None) -> None:
        self.runs = runs
        self.client = client
        self.trace_parent = trace_parent
        self.deadline = deadline
        self.out: asyncio.Queue = asyncio.Queue()
        self.running: dict[str, asyncio.Task] = {}

    async def serve(self, requests: AsyncIterator[router_pb2.SessionRequest]) -> AsyncIterator[router_pb2.RunEvent]:
        reader = asyncio.create_task(self._read(requests))
        reader.add_done_callback(lambda _t: self.out.put_nowait(_DONE))
        try:
            while (item := await self.out.get()) is not _DONE:
                yield item
            while not self.out.empty():
                item = self.out.get_nowait()
                if item is not _DONE:
                    yield item
            if not reader.cancelled() and reader.exception() is not None:
                raise reader.exception()
        finally:
            reader.cancel()
            for task in list(self.running.values()):
                task.cancel()

    async def _read(self, requests: AsyncIterator[router_pb2.SessionRequest]) -> None:
        async for req in requests:
            kind = req.WhichOneof("kind")
            if kind == "run":
                self._start(req.run)
            elif kind == "cancel":
                task = self.running.get(req.cancel.run_id)
                if task is not None:
                    task.cancel()
                else:
                    self.out.put_nowait(error_event(req.cancel.run_id, StatusError(
                        grpc.StatusCode.NOT_FOUND, f"cancel.run_id: no running run {req.cancel.run_id!r}",
                        "cancel.run_id")))
            else:   # neither set (or a kind this router does not know): say so rather than drop it
                self.out.put_nowait(error_event("", invalid("kind", "one of run or cancel must be set")))
        if self.running:  # the client half-closed: finish what it started, then end the stream
            await asyncio.gather(*self.running.values(), return_exceptions=True)

    def _start(self, request: router_pb2.RunRequest) -> None:
        run_id = request.run_id
        try:
            if not run_id:
                raise invalid("run.run_id", "is required in a Session (events are matched by it)")
            if run_id in self.running:
                raise invalid("run.run_id", f"{run_id!r} is already running in this session")
            prepared = self.runs.prepare(request, prefix="run.", client=self.client)
            prepared.trace_parent = self.trace_parent
        except StatusError as err:
            self.out.put_nowait(error_event(run_id, err))
            return
        task = asyncio.create_task(self._run(prepared))
        self.running[run_id] = task
        task.add_done_callback(lambda _t: self.running.pop(run_id, None))

    async def _run(self, run: PreparedRun) -> None:
        try:
            async for event in run_events(self.runs, run, self.deadline):
                self.out.put_nowait(event)
        except StatusError as err:
            if err.field and not err.field.startswith("run."):
                # Found once the run was under way (a worker's check): name it as the Session's field.
                err = StatusError(err.code, f"run.{err.message}" if err.message.startswith(err.field)
                                  else err.message, f"run.{err.field}", err.reason)
            self.out.put_nowait(error_event(run.run_id, err))
        except asyncio.CancelledError:
            self.out.put_nowait(error_event(run.run_id, StatusError(grpc.StatusCode.CANCELLED,
                                                                    "cancelled by the client")))
