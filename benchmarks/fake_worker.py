"""python -m benchmarks.fake_worker --port N [--step-ms 0]: the real worker service over ConstantSpeedEngine."""

from __future__ import annotations

import argparse
import asyncio

from benchmarks.fake_engine import ConstantSpeedEngine
from trellis_rpc.logs import configure_logging
from trellis_rpc.server import run_until_signalled, start_server
from trellis_rpc.telemetry import configure_metrics, configure_tracing, shutdown_telemetry
from trellis_rpc.v1 import worker_pb2, worker_pb2_grpc
from worker_runtime.service import WorkerService


async def serve(port: int, step_ms: float) -> None:
    service = WorkerService(worker_id="fake")
    service.attach(ConstantSpeedEngine(step_ms / 1000))
    served = await start_server("127.0.0.1", port, lambda s: worker_pb2_grpc.add_WorkerServicer_to_server(service, s),
                                (worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name,))
    await served.set_serving(True)
    await run_until_signalled(served, 1.0)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--step-ms", type=float, default=0.0)
    p.add_argument("--metrics-port", type=int, default=0)
    args = p.parse_args()
    configure_logging("fake_worker", "WARNING")
    configure_tracing("worker")
    configure_metrics("worker", args.metrics_port, "127.0.0.1")
    try:
        asyncio.run(serve(args.port, args.step_ms))
    finally:
        shutdown_telemetry()


if __name__ == "__main__":
    main()
