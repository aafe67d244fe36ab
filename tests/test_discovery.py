"""Worker discovery: DNS names and a re-read file; workers that appear take work, workers that go are retired."""

from __future__ import annotations

import time

import grpc

from client.launcher import start_router, start_worker
from router.discovery import resolve
from tests.helpers import chat
from trellis_rpc.v1 import common_pb2, router_pb2, router_pb2_grpc


def test_sources_resolve():
    assert resolve("10.0.0.5:50061") == {"10.0.0.5:50061"}
    assert "127.0.0.1:50061" in resolve("dns:localhost:50061")


def served_by(stub) -> str:
    return stub.Generate(router_pb2.GenerateRequest(prompt=chat("hi"), sampling=common_pb2.SamplingParams(
        max_tokens=1)), timeout=30).worker_id


def test_a_worker_that_appears_takes_work_and_one_that_goes_gets_none(tiny_model, tiny_worker, logs, tmp_path):
    listing = tmp_path / "workers"
    listing.write_text(f"{tiny_worker.address}\n")
    newcomer = start_worker(str(tiny_model), logs, name="discovered-worker",
                            extra=["--threads", "1", "--worker-id", "newcomer"])
    router = start_router([f"file:{listing}"], logs, name="discovery-router",
                          extra=["--discovery-interval", "0.3", "--routing", "round_robin"])
    try:
        newcomer.wait_serving(timeout=120)
        router.wait_serving(timeout=60)
        with grpc.insecure_channel(router.address) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            assert {served_by(stub) for _ in range(3)} != {"newcomer"}
            listing.write_text(f"# scaled\n{tiny_worker.address}\n{newcomer.address}\n")
            deadline = time.monotonic() + 20
            while "newcomer" not in {served_by(stub) for _ in range(2)}:
                assert time.monotonic() < deadline, "the discovered worker never took work"
                time.sleep(0.2)
            listing.write_text(f"{newcomer.address}\n")      # the first worker leaves the listing
            time.sleep(1.5)
            assert {served_by(stub) for _ in range(6)} == {"newcomer"}
    finally:
        router.stop()
        newcomer.stop()


def test_dns_names_are_resolved(tiny_worker, logs):
    port = tiny_worker.address.rsplit(":", 1)[1]
    router = start_router([f"dns:localhost:{port}"], logs, name="dns-router", extra=["--discovery-interval", "0.5"])
    try:
        router.wait_serving(timeout=60)
        with grpc.insecure_channel(router.address) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            assert served_by(stub)
    finally:
        router.stop()
