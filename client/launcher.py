"""Start router and worker processes on loopback and wait until they serve (grpc.health.v1).

Used by `make demo` and by the end-to-end tests, so both exercise the processes exactly as an
operator starts them: `python -m worker_cpu ...`, `python -m router ...`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

WORKER_SERVICE = "trellis.v1.Worker"
ROUTER_SERVICE = "trellis.v1.Router"
HTTP_HEALTH = "http:/health"    # the gateway: ready when GET /health answers 200 (its router serves)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Process:
    name: str
    popen: subprocess.Popen
    port: int
    log_path: Path
    service: str
    _log_file: object = field(default=None, repr=False)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_serving(self, timeout: float) -> None:
        """Poll the health check (grpc.health.v1, or the gateway's GET /health) until it says serving; fail early
        (with the log) if the process dies."""
        if self.service == HTTP_HEALTH:
            import httpx

            def serving() -> bool:
                try:
                    return httpx.get(f"http://{self.address}/health", timeout=1).status_code == 200
                except httpx.HTTPError:
                    return False

            return self._poll(serving, timeout)
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)

            def serving() -> bool:
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=self.service), timeout=1)
                except grpc.RpcError:
                    return False
                return reply.status == health_pb2.HealthCheckResponse.SERVING

            self._poll(serving, timeout)

    def _poll(self, serving, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{self.log_tail()}")
            if serving():
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} not serving after {timeout:.0f}s:\n{self.log_tail()}")
            time.sleep(0.2)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM (graceful drain), then SIGKILL if it does not exit in time."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        if self._log_file:
            self._log_file.close()
        return self.popen.returncode


def _spawn(name: str, module: str, args: list[str], port: int, service: str, log_dir: Path,
           env: dict[str, str] | None) -> Process:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    log_file = open(log_path, "w")
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "TRELLIS_LOG_FORMAT": "json", **(env or {})}
    popen = subprocess.Popen([sys.executable, "-m", module, *args], stdout=log_file, stderr=subprocess.STDOUT,
                             env=full_env, start_new_session=True)
    return Process(name, popen, port, log_path, service, log_file)


def start_worker(model: str, log_dir: Path, port: int | None = None, extra: list[str] | None = None,
                 env: dict[str, str] | None = None, name: str = "worker") -> Process:
    port = port or free_port()
    return _spawn(name, "worker_cpu", ["--model", model, "--port", str(port), *(extra or [])], port,
                  WORKER_SERVICE, log_dir, env)


def start_openai_worker(base_url: str, log_dir: Path, port: int | None = None, extra: list[str] | None = None,
                        env: dict[str, str] | None = None, name: str = "worker-openai") -> Process:
    """python -m worker_openai in front of an OpenAI-compatible server at base_url (e.g. http://host:8000/v1)."""
    port = port or free_port()
    return _spawn(name, "worker_openai", ["--base-url", base_url, "--port", str(port), *(extra or [])], port,
                  WORKER_SERVICE, log_dir, env)


def start_router(workers: list[str], log_dir: Path, port: int | None = None, extra: list[str] | None = None,
                 env: dict[str, str] | None = None, name: str = "router") -> Process:
    port = port or free_port()
    return _spawn(name, "router", ["--workers", ",".join(workers), "--port", str(port), *(extra or [])], port,
                  ROUTER_SERVICE, log_dir, env)


def start_gateway(router: str, log_dir: Path, port: int | None = None, extra: list[str] | None = None,
                  env: dict[str, str] | None = None, name: str = "gateway") -> Process:
    """python -m gateway, the OpenAI-compatible HTTP gateway in front of the router at `router`."""
    port = port or free_port()
    return _spawn(name, "gateway", ["--router", router, "--port", str(port), *(extra or [])], port,
                  HTTP_HEALTH, log_dir, env)
