"""Run a controller in this process against in-process workers (notebooks, tests, scripts).

The workers are WorkerService objects with an engine attached (e.g. torch_engine's TorchEngine); the
run takes the router's own dispatch path (pool, worker links, RemoteRunner) minus the sockets, so it
behaves exactly as it does behind a router:

    service = WorkerService(); service.attach(TorchEngine(load_model("default")))
    result = run_local(MajorityVote(n=8), Prompt(text="What is 9 times 3?"), [service])
"""

from __future__ import annotations

import asyncio
import time
import uuid

from controllers import Controller, Prompt, Result
from controllers.runtime import DeltaSink, EventSink, drive
from router.dispatch import RemoteRunner, step_span
from router.pool import WorkerPool
from trellis_rpc.v1 import common_pb2


async def run_in_process(controller: Controller, prompt: Prompt, services: list, *, model: str = "",
                         sampling: common_pb2.SamplingParams | None = None, timeout_s: float | None = None,
                         on_event: EventSink | None = None, on_delta: DeltaSink | None = None) -> Result:
    pool = WorkerPool([], services=services)
    pool.start()
    try:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        runner = RemoteRunner(pool, uuid.uuid4().hex, model, sampling or common_pb2.SamplingParams(),
                              deadline=deadline, worker_wait_s=10.0)
        run = drive(controller, prompt, runner, on_event or (lambda event: None),
                    on_delta or (lambda branch, text, count: None), step_span)
        try:
            return await (run if timeout_s is None else asyncio.wait_for(run, timeout_s))
        finally:
            runner.release_kept()
            await asyncio.sleep(0)   # let the links send it before they close
    finally:
        await pool.close()


def run_local(controller: Controller, prompt: Prompt, services: list, **kwargs) -> Result:
    """Blocking run_in_process, for code that has no event loop."""
    return asyncio.run(run_in_process(controller, prompt, services, **kwargs))
