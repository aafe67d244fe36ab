"""`trellis up`: a router and two CPU workers as local processes, the workers found through a re-read
discovery file as the cluster finds them through DNS, and the OpenAI-compatible gateway in front; one run
through the router, both workers take work, a chat completion comes back through the gateway, the workers'
metrics carry the gauge the GPU autoscaler uses, every process takes its settings from one --config file (where
`up`'s own flags do not win), and Ctrl-C stops every process (the gateway first) in time."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import httpx
import pytest

from client.launcher import free_port
from tests.helpers import chat, run_request
from trellis_rpc.v1 import common_pb2, router_pb2, router_pb2_grpc

# Starts workers and routers: the slower half of the suite.
pytestmark = pytest.mark.processes

ROOT = Path(__file__).resolve().parent.parent
DRAIN_S = 5.0
# `up` stops the gateway (drain + 10 s at most), then the router (the same), then the workers (the same):
# the bound it promises.
GRACE_S = 3 * (DRAIN_S + 10.0)
READY = "Ctrl-C stops everything."


def read_lines(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def read_until(lines: queue.Queue, marker: str, timeout: float) -> str:
    """stdout up to the line containing marker; fails with what was printed when it does not come."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(f"no {marker!r} within {timeout:.0f} s:\n{''.join(seen)}") from None
        if line is None:
            raise AssertionError(f"`trellis up` exited before {marker!r}:\n{''.join(seen)}")
        seen.append(line)
        if marker in line:
            return "".join(seen)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# One file for every process `up` starts: each reads its own table. The router's port and discovery interval are
# flags `up` sets, which win over the file (port 1 would not even bind).
SETTINGS = """
[router.server]
port = 1

[router.discovery]
discovery_interval = 30

[router.admission]
max_queued_runs = 7

[gateway.requests]
max_choices = 3

[worker_cpu.engine]
max_n = 32
"""


def logged_settings(log: Path) -> dict:
    """The process's 'settings' log line (JSON): every effective setting, and the source of each not left at its
    default."""
    for line in log.read_text(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("event") == "settings":
            return event
    raise AssertionError(f"no settings line in {log}")


def served_by(stub: router_pb2_grpc.RouterStub) -> str:
    reply = stub.Generate(router_pb2.GenerateRequest(prompt=chat("hi"), sampling=common_pb2.SamplingParams(
        max_tokens=1)), timeout=30)
    return reply.worker_id


def test_up_serves_through_both_discovered_workers_and_the_gateway_and_stops_on_ctrl_c(tiny_model, tmp_path):
    port, gateway_port = free_port(), free_port()
    config = tmp_path / "trellis.toml"
    config.write_text(SETTINGS)
    cmd = [sys.executable, "-m", "client", "up", "--cpu-workers", "2", "--model", str(tiny_model),
           "--router-port", str(port), "--gateway-port", str(gateway_port), "--threads", "1", "--metrics",
           "--drain-seconds", str(DRAIN_S), "--config", str(config),
           "--discovery-interval", "0.5", "--router-arg=--routing=round_robin", "--log-dir", str(tmp_path)]
    up = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=read_lines, args=(up.stdout, lines), daemon=True).start()
    pids: list[int] = []
    try:
        out = read_until(lines, READY, timeout=120)
        pids = [int(p) for p in re.findall(r"\bpid (\d+)", out)]
        assert len(pids) == 4, out  # two workers, the router, the gateway
        assert f"ready: router 127.0.0.1:{port} with 2 CPU worker(s)" in out
        gateway_url = f"http://127.0.0.1:{gateway_port}/v1"
        assert f"OpenAI-compatible gateway: {gateway_url}" in out, out
        gateway_pid = int(re.search(r"gateway\s+\S+\s+pid (\d+)", out).group(1))
        assert "not logged discovering" not in out, out
        listing = (tmp_path / "workers").read_text().split()
        assert len([a for a in listing if a.startswith("127.0.0.1:")]) == 2

        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            result = stub.Run(run_request("native_generation", max_tokens=6, seed=1), timeout=60)
            assert result.usage.completion_tokens >= 1 and result.candidates[0].text == result.text
            # Round robin over what discovery found: both workers, by the ids `up` gave them.
            assert {served_by(stub) for _ in range(4)} == {"worker-1", "worker-2"}

        # The OpenAI-compatible API, through the gateway to the router and a worker.
        reply = httpx.post(f"{gateway_url}/chat/completions", timeout=60, json={
            "model": "native_generation", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
        assert reply.status_code == 200, reply.text
        choices = reply.json()["choices"]
        assert len(choices) == 1 and choices[0]["message"]["role"] == "assistant", reply.text
        assert isinstance(choices[0]["message"]["content"], str) and choices[0]["finish_reason"], reply.text

        # The settings file reached every process: the router's admission limit and the gateway's max_choices
        # from it, the flags `up` sets over it.
        from_file = f"file {config.resolve()}"
        router = logged_settings(tmp_path / "router.log")
        assert router["settings"]["admission.max_queued_runs"] == 7, router
        assert router["overridden"]["router.admission.max_queued_runs"] == from_file, router
        assert router["settings"]["server.port"] == port and router["settings"]["discovery.discovery_interval"] == 0.5
        assert router["overridden"]["router.discovery.discovery_interval"] == "flag --discovery-interval", router
        for name in ("worker-1", "worker-2"):
            worker = logged_settings(tmp_path / f"{name}.log")
            assert worker["settings"]["engine.max_n"] == 32, worker
            assert worker["overridden"]["worker_cpu.engine.max_n"] == from_file, worker
        gateway = logged_settings(tmp_path / "gateway.log")
        assert gateway["overridden"]["gateway.requests.max_choices"] == from_file, gateway
        refused = httpx.post(f"{gateway_url}/chat/completions", timeout=60, json={
            "model": "native_generation", "n": 4, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["param"] == "n" and "at most 3" in refused.json()["error"]["message"]

        urls = dict(re.findall(r"metrics (worker-\d|gateway)\s+(http://\S+)", out))
        assert set(urls) == {"worker-1", "worker-2", "gateway"}
        with urllib.request.urlopen(urls["worker-1"], timeout=10) as reply:
            assert "trellis_worker_queue_depth{" in reply.read().decode()  # the GPU HPA's metric
        with urllib.request.urlopen(urls["gateway"], timeout=10) as reply:
            assert "trellis_gateway_requests" in reply.read().decode()  # counted the completion above

        stopped = time.monotonic()
        up.send_signal(signal.SIGINT)
        up.wait(timeout=GRACE_S)
        took = time.monotonic() - stopped
        rest = "".join(iter(lines.get, None))
        assert up.returncode == 0, rest
        assert "stopped (gateway 0, router 0, worker-1 0, worker-2 0)" in rest, rest
        assert not alive(gateway_pid), "the gateway outlived `trellis up`"
        assert not [p for p in pids if alive(p)], "a process outlived `trellis up`"
        print(f"stopped in {took:.1f} s")
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        for pid in pids:  # only if the test failed midway: never leave a process behind
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
