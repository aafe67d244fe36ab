"""Fixtures that start real worker and router processes on free loopback ports."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import grpc
import pytest

from client.launcher import Process, start_router, start_worker
from tests.tiny_model import build_tiny_llama
from trellis_rpc.v1 import router_pb2_grpc, worker_pb2_grpc

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Router limit the tests check against (n above it is INVALID_ARGUMENT).
ROUTER_MAX_N = 16

# Fixtures that start worker and router processes: a test using any of them is marked `processes`.
PROCESS_FIXTURES = {"tiny_worker", "tiny_router", "router", "worker_channel", "worker_stub", "client_stack", "gateway"}


# ---- the `processes` marker: `pytest -m "not processes"` runs the in-process half in seconds ------------

def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if PROCESS_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.processes)


_running: list[pytest.Item | None] = [None]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    _running[0] = item      # its fixtures too: setup, call and teardown all run inside this hook
    try:
        yield
    finally:
        _running[0] = None


def _refuse_unmarked(execute_child):
    """Keeps the marker true: a test not marked `processes` that starts one (itself or through a fixture)
    fails, naming the marker, instead of silently slowing the fast half down."""
    def guarded(self, *args, **kwargs):
        item = _running[0]
        if item is not None and item.get_closest_marker("processes") is None:
            raise RuntimeError(f"{item.nodeid} starts a process ({args[0]!r}): mark it @pytest.mark.processes")
        return execute_child(self, *args, **kwargs)
    return guarded


def pytest_configure(config: pytest.Config) -> None:
    subprocess.Popen._execute_child = _refuse_unmarked(subprocess.Popen._execute_child)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def logs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def tiny_worker(tiny_model, logs) -> Process:
    # float32: tests check its verifier and logprobs against the HF model's own in float32 (--dtype auto, the
    # default, picks bfloat16 on CPUs with bf16 instructions; test_smollm2 runs the default)
    proc = start_worker(str(tiny_model), logs, name="tiny-worker", extra=["--threads", "1", "--dtype", "float32"])
    try:
        proc.wait_serving(timeout=120)
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def tiny_router(tiny_worker, logs) -> Process:
    proc = start_router([tiny_worker.address], logs, name="tiny-router", extra=["--max-n", str(ROUTER_MAX_N)])
    try:
        proc.wait_serving(timeout=60)
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def router(tiny_router) -> router_pb2_grpc.RouterStub:
    with grpc.insecure_channel(tiny_router.address) as channel:
        yield router_pb2_grpc.RouterStub(channel)


@pytest.fixture(scope="session")
def worker_channel(tiny_worker) -> grpc.Channel:
    with grpc.insecure_channel(tiny_worker.address) as channel:
        yield channel


@pytest.fixture
def worker_stub(worker_channel) -> worker_pb2_grpc.WorkerStub:
    return worker_pb2_grpc.WorkerStub(worker_channel)


@pytest.fixture(scope="session")
def client_stack(tiny_model, logs) -> dict:
    """A tiny worker whose metrics (KV blocks, running sequences) the tests read, and a router over it: what the
    client library and the gateway are tested against. {"worker", "router", "worker_metrics"}"""
    from client.launcher import free_port

    metrics = free_port()
    worker = start_worker(str(tiny_model), logs, name="client-worker",
                          extra=["--threads", "1", "--dtype", "float32", "--metrics-port", str(metrics)])
    router = None
    try:
        worker.wait_serving(timeout=120)
        router = start_router([worker.address], logs, name="client-router", extra=["--max-n", str(ROUTER_MAX_N)])
        router.wait_serving(timeout=60)
        yield {"worker": worker, "router": router, "worker_metrics": metrics}
    finally:
        for proc in (router, worker):
            if proc is not None:
                proc.stop()


@pytest.fixture(scope="session")
def gateway(client_stack, logs) -> Process:
    """The OpenAI-compatible gateway in front of client_stack's router."""
    from client.launcher import start_gateway

    proc = start_gateway(client_stack["router"].address, logs, name="gateway")
    try:
        proc.wait_serving(timeout=60)
        yield proc
    finally:
        proc.stop()
