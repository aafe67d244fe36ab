"""Graceful drain: SIGTERM to the router stops new work at once and loses no accepted run."""

from __future__ import annotations

import signal
import threading
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client.launcher import start_router
from tests.helpers import run_request
from trellis_rpc.v1 import router_pb2_grpc


def test_sigterm_finishes_accepted_runs_and_refuses_new_ones(tiny_worker, logs):
    router = start_router([tiny_worker.address], logs, name="drain-router", extra=["--drain-seconds", "60"])
    router.wait_serving(timeout=60)
    results, errors = [], []
    started = threading.Barrier(9)

    def run(i: int):
        with grpc.insecure_channel(router.address) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            stream = stub.RunStream(run_request("native_generation", max_tokens=120, ignore_eos=True, seed=i),
                                    timeout=120)
            try:
                for event in stream:
                    if event.WhichOneof("event") == "started":
                        started.wait(timeout=30)
                    elif event.WhichOneof("event") == "result":
                        results.append(event.result.usage.completion_tokens)
            except grpc.RpcError as err:
                errors.append(err.code())

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    started.wait(timeout=30)                  # all eight accepted
    router.popen.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    with grpc.insecure_channel(router.address) as channel:
        try:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        except grpc.RpcError as err:           # or already refusing new calls outright
            assert err.code() == grpc.StatusCode.UNAVAILABLE
    for t in threads:
        t.join(timeout=120)
    assert not errors and results == [120] * 8
    assert router.popen.wait(timeout=30) == 0   # then it exits on its own
