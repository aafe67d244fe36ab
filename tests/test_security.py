"""TLS on every hop and client authorization, with real processes on loopback.

A CA made here with the openssl CLI signs a server certificate (127.0.0.1 / localhost), the router's
client certificate and a batch client's. The worker and the router serve mutual TLS; the router dials
the worker with its certificate and admits clients from an auth file: a bearer-token client limited to
native_generation, n <= 2 and 16 tokens, and a client known by its certificate's common name.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client.launcher import ROUTER_SERVICE, WORKER_SERVICE, _spawn, free_port
from router.dispatch import RemoteRunner
from router.limits import RunLimits
from tests.helpers import run_request
from trellis_rpc.v1 import common_pb2, router_pb2, router_pb2_grpc

TOKEN = "s3cret-token-for-tests"
pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI to make certificates")


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def issue(cwd: Path, name: str, subject: str, ext: str = "") -> None:
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject,
            cwd=cwd)
    extra = []
    if ext:
        (cwd / f"{name}.ext").write_text(ext)
        extra = ["-extfile", f"{name}.ext"]
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "2", *extra, cwd=cwd)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=trellis-test-ca", cwd=d)
    issue(d, "server", "/CN=localhost", "subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    issue(d, "router-client", "/CN=router")
    issue(d, "batch", "/CN=batch.jobs")
    (d / "auth.json").write_text(json.dumps({"clients": [
        {"name": "search", "token_sha256": hashlib.sha256(TOKEN.encode()).hexdigest(),
         "controllers": ["native_generation"], "max_n": 2, "max_tokens": 16, "max_concurrent_runs": 4},
        {"name": "batch", "mtls_common_name": "batch.jobs", "controllers": "*"}]}))
    return d


@pytest.fixture(scope="module")
def secured(pki, tiny_model, logs):
    worker_port, router_port = free_port(), free_port()
    worker = _spawn("tls-worker", "worker_cpu", [
        "--model", str(tiny_model), "--port", str(worker_port), "--threads", "1",
        "--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key"),
        "--tls-client-ca", str(pki / "ca.pem")], worker_port, WORKER_SERVICE, logs, None)
    router = _spawn("tls-router", "router", [
        "--workers", f"127.0.0.1:{worker_port}", "--port", str(router_port),
        "--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key"),
        "--tls-client-ca", str(pki / "ca.pem"),
        "--worker-tls-ca", str(pki / "ca.pem"), "--worker-tls-cert", str(pki / "router-client.pem"),
        "--worker-tls-key", str(pki / "router-client.key"), "--auth-file", str(pki / "auth.json")],
        router_port, ROUTER_SERVICE, logs, None)
    try:
        yield worker, router
    finally:
        router.stop()
        worker.stop()


def tls_channel(pki: Path, address: str, cert: str | None = None) -> grpc.Channel:
    key = (pki / f"{cert}.key").read_bytes() if cert else None
    chain = (pki / f"{cert}.pem").read_bytes() if cert else None
    return grpc.secure_channel(address, grpc.ssl_channel_credentials((pki / "ca.pem").read_bytes(), key, chain))


def wait_serving(channel: grpc.Channel, service: str, proc, timeout: float = 120.0) -> None:
    import time

    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout
    while True:
        assert proc.popen.poll() is None, proc.log_tail()
        try:
            if stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status == 1:
                return
        except grpc.RpcError:
            pass
        assert time.monotonic() < deadline, proc.log_tail()
        time.sleep(0.3)


BEARER = (("authorization", f"Bearer {TOKEN}"),)


@pytest.mark.processes
def test_tls_and_authorization_on_every_hop(secured, pki):
    worker, router = secured
    with tls_channel(pki, worker.address, "router-client") as channel:
        wait_serving(channel, WORKER_SERVICE, worker)
    # Any certificate the CA signed gets through TLS; the token says who the client is.
    with tls_channel(pki, router.address, "router-client") as channel:
        wait_serving(channel, ROUTER_SERVICE, router)   # health needs no token (Kubernetes probes it)
        stub = router_pb2_grpc.RouterStub(channel)
        result = stub.Run(run_request(max_tokens=6, seed=1), timeout=60, metadata=BEARER)
        assert result.usage.completion_tokens > 0     # router -> worker over mutual TLS worked

        def refused(request, metadata=BEARER) -> grpc.RpcError:
            with pytest.raises(grpc.RpcError) as err:
                stub.Run(request, timeout=30, metadata=metadata)
            return err.value

        assert refused(run_request(max_tokens=4), metadata=()).code() == grpc.StatusCode.UNAUTHENTICATED
        wrong = refused(run_request(max_tokens=4), metadata=(("authorization", "Bearer nope"),))
        assert wrong.code() == grpc.StatusCode.UNAUTHENTICATED
        other = refused(run_request("majority_vote", max_tokens=4))
        assert other.code() == grpc.StatusCode.PERMISSION_DENIED and other.details().startswith("controller:")
        long = refused(run_request(max_tokens=64))
        assert long.code() == grpc.StatusCode.PERMISSION_DENIED and long.details().startswith("sampling.max_tokens")
        default = refused(router_pb2.RunRequest(controller="native_generation", prompt=common_pb2.Prompt(text="x")))
        assert default.code() == grpc.StatusCode.PERMISSION_DENIED   # the default 256 tokens is over 16
        listed = stub.ListControllers(router_pb2.ListControllersRequest(), timeout=10, metadata=BEARER)
        assert [c.name for c in listed.controllers] == ["native_generation"]

    # The batch client is known by its certificate, and may run anything.
    with tls_channel(pki, router.address, "batch") as channel:
        result = router_pb2_grpc.RouterStub(channel).Run(
            run_request("majority_vote", params={"n": 3}, max_tokens=4, seed=2), timeout=60)
        assert len(result.candidates) == 3

    # Plaintext, or TLS without a client certificate, gets nowhere.
    for channel in (grpc.insecure_channel(router.address), tls_channel(pki, router.address)):
        with channel, pytest.raises(grpc.RpcError) as err:
            router_pb2_grpc.RouterStub(channel).Run(run_request(max_tokens=2), timeout=5, metadata=BEARER)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    with tls_channel(pki, worker.address) as channel, pytest.raises(grpc.RpcError) as err:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.processes
def test_client_library_and_gateway_over_mutual_tls(secured, pki, logs):
    """trellis_client dials the router over mutual TLS with a token or as a certificate's identity; the gateway
    does the same for its callers, serves them HTTPS itself, and passes their bearer token through."""
    import ssl

    import httpx
    import openai

    from client.launcher import start_gateway
    from trellis_client import Client, TrellisError
    from trellis_rpc.tls import ClientTLS

    worker, router = secured
    with tls_channel(pki, worker.address, "router-client") as channel:
        wait_serving(channel, WORKER_SERVICE, worker)
    with tls_channel(pki, router.address, "router-client") as channel:
        wait_serving(channel, ROUTER_SERVICE, router)
    tls = ClientTLS(pki / "ca.pem", pki / "router-client.pem", pki / "router-client.key")
    with Client(router.address, tls=tls, token=TOKEN) as client:
        assert client.run("native_generation", "hi", sampling={"max_tokens": 4}).usage.completion_tokens > 0
        with pytest.raises(TrellisError) as err:
            client.run("majority_vote", "hi", sampling={"max_tokens": 4})
        assert err.value.code == grpc.StatusCode.PERMISSION_DENIED and err.value.field == "controller"
    batch = ClientTLS(pki / "ca.pem", pki / "batch.pem", pki / "batch.key")
    with Client(router.address, tls=batch, token="") as client:
        assert len(client.run("majority_vote", "hi", params={"n": 2}, sampling={"max_tokens": 4}).candidates) == 2

    gateway = start_gateway(router.address, logs, name="tls-gateway", extra=[
        "--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key"),
        "--router-tls-ca", str(pki / "ca.pem"), "--router-tls-cert", str(pki / "router-client.pem"),
        "--router-tls-key", str(pki / "router-client.key")])
    try:
        import time

        ca = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        deadline = time.monotonic() + 60
        while True:
            assert gateway.popen.poll() is None, gateway.log_tail()
            try:
                if httpx.get(f"https://{gateway.address}/health", verify=ca, timeout=2).is_success:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, gateway.log_tail()
            time.sleep(0.3)
        base = f"https://{gateway.address}/v1"
        verified = httpx.Client(verify=ca)
        sdk = openai.OpenAI(base_url=base, api_key=TOKEN, max_retries=0, http_client=verified)
        reply = sdk.chat.completions.create(model="native_generation", max_tokens=4,
                                            messages=[{"role": "user", "content": "hi"}])
        assert reply.usage.completion_tokens > 0
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base, api_key="nope", max_retries=0, http_client=verified).chat.completions.create(
                model="native_generation", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
        with pytest.raises((httpx.ConnectError, httpx.RemoteProtocolError)):     # plain HTTP is not served
            httpx.get(f"http://{gateway.address}/health", timeout=5)
    finally:
        gateway.stop()


@pytest.mark.processes
def test_plaintext_off_loopback_must_be_asked_for(pki):
    for module in ("router", "worker_cpu", "gateway"):
        extra = ["--workers", "127.0.0.1:1"] if module == "router" else []
        proc = subprocess.run([sys.executable, "-m", module, "--host", "0.0.0.0", "--port", "0", *extra],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and "--plaintext" in proc.stderr, proc.stderr
    proc = subprocess.run([sys.executable, "-m", "router", "--workers", "127.0.0.1:1", "--tls-cert",
                           str(pki / "server.pem")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--tls-key" in proc.stderr


@pytest.mark.processes
def test_bad_auth_file_is_refused_at_start(tmp_path):
    bad = tmp_path / "auth.json"
    bad.write_text(json.dumps({"clients": [{"name": "x", "token_sha256": "abc", "max_n": -1}]}))
    proc = subprocess.run([sys.executable, "-m", "router", "--workers", "127.0.0.1:1", "--auth-file", str(bad)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "token_sha256" in proc.stderr


def test_a_run_may_start_only_so_many_tasks():
    from controllers.runtime import TaskFailed

    runner = RemoteRunner(None, "r", "", common_pb2.SamplingParams(), limits=RunLimits(max_tasks=2), worker_wait_s=1.0)
    runner._next_task()
    runner._next_task()
    with pytest.raises(TaskFailed) as err:
        runner._next_task()
    assert err.value.failure.code == "RESOURCE_EXHAUSTED"


@pytest.mark.parametrize("n", [0, 9, 10**9])
def test_a_task_over_the_n_cap_fails_before_anything_is_allocated(n):
    """A controller's own n (not from a parameter the router caps) is checked too: 10**9 samples would
    otherwise allocate 10**9 per-sample records before any worker could refuse them."""
    import asyncio

    from controllers import Generate, Prompt
    from controllers.runtime import TaskFailed

    runner = RemoteRunner(None, "r", "", common_pb2.SamplingParams(), limits=RunLimits(max_n=8), worker_wait_s=1.0)
    with pytest.raises(TaskFailed) as err:
        asyncio.run(runner.generate(Generate(Prompt(text="q"), n=n), lambda delta: None))
    assert err.value.failure.code == "RESOURCE_EXHAUSTED" and f"n={n}" in err.value.failure.message
    assert runner.usage.tasks == 0


@pytest.mark.processes
def test_a_rotated_serving_certificate_is_used_without_a_restart(pki, tiny_model, logs, tmp_path):
    """The kubelet swaps a renewed secret's files under a running pod: the next handshake uses them."""
    import os

    live = tmp_path / "live"
    live.mkdir()
    for name in ("server.pem", "server.key"):
        shutil.copy(pki / name, live / name)
    port = free_port()
    worker = _spawn("tls-rotate-worker", "worker_cpu", [
        "--model", str(tiny_model), "--port", str(port), "--threads", "1",
        "--tls-cert", str(live / "server.pem"), "--tls-key", str(live / "server.key")], port, WORKER_SERVICE, logs,
        None)
    # Another CA signs the renewed certificate, so which one a handshake got is plain to see.
    ca2 = tmp_path / "ca2"
    ca2.mkdir()
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=trellis-test-ca-2", cwd=ca2)
    issue(ca2, "server", "/CN=localhost", "subjectAltName=IP:127.0.0.1,DNS:localhost\n")

    def serving(ca: Path) -> bool:
        # A channel of its own (no shared subchannel pool): a new connection, so a new handshake.
        creds = grpc.ssl_channel_credentials((ca / "ca.pem").read_bytes())
        with grpc.secure_channel(worker.address, creds, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
            try:
                reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=WORKER_SERVICE),
                                                             timeout=5)
            except grpc.RpcError:
                return False
            return reply.status == health_pb2.HealthCheckResponse.SERVING

    try:
        with tls_channel(pki, worker.address) as channel:
            wait_serving(channel, WORKER_SERVICE, worker)
        assert serving(pki) and not serving(ca2)
        for name in ("server.key", "server.pem"):   # each replaced atomically, as a symlink swap is
            shutil.copy(ca2 / name, live / f".{name}.new")
            os.replace(live / f".{name}.new", live / name)
        assert serving(ca2) and not serving(pki)
        assert "tls certificate reloaded" in worker.log_tail()
    finally:
        worker.stop()


@pytest.mark.processes
def test_the_router_dials_with_rotated_client_files_on_its_next_connection(pki, tmp_path):
    import asyncio
    import os

    from router.worker_connection import WorkerConnection
    from trellis_rpc.tls import ClientTLS

    for name in ("ca.pem", "router-client.pem", "router-client.key"):
        shutil.copy(pki / name, tmp_path / name)
    tls = ClientTLS(tmp_path / "ca.pem", tmp_path / "router-client.pem", tmp_path / "router-client.key")

    async def main():
        link = WorkerConnection("127.0.0.1:1", asyncio.Event(), tls=tls)
        first = link._channel
        await link._renew_channel()
        unchanged = link._channel is first
        shutil.copy(pki / "batch.pem", tmp_path / ".new")
        os.replace(tmp_path / ".new", tmp_path / "router-client.pem")
        await link._renew_channel()
        renewed = link._channel is not first
        await link.close()
        return unchanged, renewed

    assert asyncio.run(main()) == (True, True)


@pytest.mark.processes
def test_code_in_a_model_directory_runs_only_when_trusted(tmp_path, logs):
    """A reward model whose classes are its own Python (auto_map): refused with the flag to pass, then served."""
    from tests.tiny_model import build_remote_code_reward_model
    from trellis_rpc.v1 import worker_pb2, worker_pb2_grpc

    model = build_remote_code_reward_model(tmp_path / "custom-orm")

    port = free_port()
    refused = _spawn("remote-code-refused", "worker_cpu", ["--model", str(model), "--port", str(port)], port,
                     WORKER_SERVICE, logs, None)
    assert refused.popen.wait(120) == 2
    assert "--trust-remote-code" in refused.log_tail()

    trusted = _spawn("remote-code-trusted", "worker_cpu", ["--model", str(model), "--port", str(port),
                                                           "--trust-remote-code"], port, WORKER_SERVICE, logs, None)
    try:
        trusted.wait_serving(timeout=120)
        with grpc.insecure_channel(trusted.address) as channel:
            info = worker_pb2_grpc.WorkerStub(channel).Info(worker_pb2.InfoRequest(), timeout=10)
        assert list(info.capabilities) == [common_pb2.CAPABILITY_SCORE_OUTCOME]
    finally:
        trusted.stop()
